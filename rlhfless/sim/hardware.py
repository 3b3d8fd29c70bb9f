"""Documented hardware and model constants for the cluster model.

Every number the simulator's physics rests on lives here, with where it comes from, so a reader
can disagree with one constant and change it in one place (or pass overrides).  Datasheet
values are peak numbers; the `Efficiency` factors turn them into what real kernels achieve.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GiB = 1024**3


@dataclass(frozen=True)
class GPUSpec:
    """Peak capabilities of one accelerator (datasheet, dense bf16)."""

    name: str
    flops: float  # bf16 dense tensor-core FLOP/s
    hbm_bw: float  # bytes/s
    mem_bytes: float
    intra_bw: float  # bytes/s per GPU, one direction, inside a node (NVLink, else PCIe)
    inter_bw: float  # bytes/s per GPU across nodes (InfiniBand / EFA share)
    load_bw: float  # bytes/s per GPU from the node-local weight cache (host RAM over PCIe)
    gpus_per_node: int = 8


# H100 SXM5: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, 80 GB, NVLink 4 at 900 GB/s bidirectional,
# one 400 Gb/s NIC per GPU.  load_bw: PCIe Gen5 x16 is 64 GB/s peak; 8 GPUs share the host's
# memory bandwidth, so ~12 GB/s each when all load at once (ServerlessLLM-style host cache).
H100 = GPUSpec("h100", 989e12, 3.35e12, 80 * GiB, 450e9, 50e9, 12e9)
# L40S (AWS g6e.48xlarge): 362 TFLOP/s bf16 dense, 864 GB/s GDDR6, 48 GB, no NVLink (PCIe Gen4
# x16 ≈ 32 GB/s), 400 Gb/s EFA shared by 8 GPUs (6.25 GB/s each), PCIe Gen4 host loads.
L40S = GPUSpec("l40s", 362e12, 864e9, 48 * GiB, 32e9, 6.25e9, 8e9)

GPUS: dict[str, GPUSpec] = {g.name: g for g in (H100, L40S)}


@dataclass(frozen=True)
class ModelShape:
    """Dense decoder-only transformer; only what the cost formulas need."""

    name: str
    params: float
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    tp: int  # tensor-parallel degree of one serving instance (actor)

    @property
    def weight_bytes(self) -> float:
        return 2.0 * self.params  # bf16

    @property
    def kv_bytes_per_token(self) -> float:
        return 2.0 * self.layers * self.kv_heads * self.head_dim * 2.0  # K and V, bf16


# Public configs: Qwen2.5-3B/7B/32B (GQA), and a Llama-3-70B-shaped model for the 70B runs.
MODELS: dict[str, ModelShape] = {
    "3b": ModelShape("qwen2.5-3b", 3.09e9, 36, 2048, 2, 128, tp=1),
    "7b": ModelShape("qwen2.5-7b", 7.62e9, 28, 3584, 4, 128, tp=1),
    "32b": ModelShape("qwen2.5-32b", 32.8e9, 64, 5120, 8, 128, tp=4),
    "70b": ModelShape("llama3-70b", 70.6e9, 80, 8192, 8, 128, tp=8),
}


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak that real systems reach, and fixed software overheads.

    decode_bw: HBM streaming efficiency of decode kernels (weights + KV reads), ~0.8 measured
      for vLLM paged attention on H100.  decode_mfu: matmul efficiency once decode turns
      compute-bound (large batches).  prefill_mfu / fwd_mfu / train_mfu: model-FLOPs utilisation
      of prefill, forward-only scoring and fwd+bwd training (FSDP/ZeRO-3 with activation
      recomputation folded in; 0.35 is typical for 7B–70B RLHF trainers).
    iter_overhead_s: CPU work per engine iteration (scheduling, sampling, detokenising) that
      CUDA graphs do not hide.  allreduce_lat_s: latency of one small NVLink all-reduce.
    """

    decode_bw: float = 0.80
    decode_mfu: float = 0.60
    prefill_mfu: float = 0.55
    fwd_mfu: float = 0.45
    train_mfu: float = 0.35
    iter_overhead_s: float = 0.003
    allreduce_lat_s: float = 8e-6


@dataclass(frozen=True)
class Overheads:
    """Per-step software costs outside the FLOP/byte model (seconds).

    actor_init_s / learner_init_s: a function instance's start before it loads weights —
      container already pulled, process + CUDA context + NCCL + engine (KV allocation, cached
      CUDA graphs) restored from a node-local snapshot.  Without snapshots vLLM takes 20–60 s;
      the sensitivity experiment sweeps this.
    colocated_switch_s: verl's per-step rollout↔training switch inside one process (vLLM
      sleep/wake, cache free, FSDP re-gather) beyond the weight bytes themselves.
    publish_fixed_s: trainer-side fixed cost of publishing a weights version.
    reward_s: rule-based reward on CPU per step (same for every system).
    call_s: one function call's round trip (HTTP, serialisation of a group), e.g. an actor
      reporting a group to the driver, or the driver sending it to reward and the learner.
    scale_down_s: from the driver's scale-down to the GPUs being free (pod termination);
      every released instance is billed this long.
    """

    actor_init_s: float = 10.0
    learner_init_s: float = 10.0
    colocated_switch_s: float = 2.0
    publish_fixed_s: float = 1.0
    reward_s: float = 1.0
    call_s: float = 0.02
    scale_down_s: float = 1.0


@dataclass(frozen=True)
class ColdStart:
    """How a function instance starts: fixed init seconds, then its weights (and, for the
    learner, its optimizer state) at `load_bw_scale` × the GPU's node-cache bandwidth."""

    init_s: float
    load_bw_scale: float = 1.0
    note: str = ""


# Cold-start variants (sources and assumptions in benchmarks/results/README.md). The default
# is the conservative one.
COLD_STARTS: dict[str, ColdStart] = {
    # container image pulled, weights in the node-local cache: process + CUDA + NCCL + engine
    # init (10 s), then the weights over PCIe from host page cache / local NVMe.
    "node-cache": ColdStart(10.0, 1.0, "10 s init + weights from the node cache"),
    # weights already pinned in host memory (a ServerlessLLM-style loader): the same init,
    # weights at about twice the bandwidth.
    "host-memory": ColdStart(10.0, 2.0, "10 s init + weights from pinned host memory"),
    # process and GPU memory restored from a snapshot (CUDA checkpoint/restore): ~2 s, then
    # the new weights version still has to be loaded.
    "snapshot": ColdStart(2.0, 1.0, "2 s restore + weights from the node cache"),
}

def override(obj, **kw):
    """Copy a frozen constants object with some fields replaced (None values ignored)."""
    return replace(obj, **{k: v for k, v in kw.items() if v is not None})

"""Memory planning at validate time: bytes per device for each stage, from the model's shape.

Pure arithmetic on a ModelShape and a few numbers of the job; `job_fit_errors` turns it into
the messages `rlhfless validate`, `rlhfless run` and the operator print. The point is to
refuse, before anything starts, a job that cannot fit its `resources` (a 48-layer,
8192-wide tiny model on one CPU trainer would otherwise die in the allocator minutes later),
and to say which fields to change.

What is counted, per instance and per device (a stage with `gpus: N` and tensor
parallelism divides weights and KV cache by N; other stages run one rank per instance):
- weights: parameters x bytes of the dtype the stage holds them in;
- training state by optimizer backend (Rajbhandari et al., "ZeRO", 2020): plain AdamW keeps
  gradients and two moments in the parameter dtype; DeepSpeed adds an fp32 master copy
  (its ZeRO-1/2 optimizers keep one even for fp32 models) and shards the optimizer state
  (stage >= 1), gradients (>= 2) and parameters (3) over the ranks; a learner with
  `gpus: N > 1` runs N FSDP2 ranks (rlhfless.train.sharding, ZeRO-3's layout): fp32 weights,
  gradients and moments, all divided by N (none on the GPU with `trainer.cpuOffload`), plus
  the units gathered for compute in bf16 (embeddings and head, two blocks), its reference
  sharded too, and each rank's share of a mini-batch's activations;
- activations of the largest forward: per layer ~ (8h + 2 kv + 2..4 i) values per token
  kept for backward (Korthikanti et al., 2022, without the attention matrix: SDPA/flash
  attention do not keep it); with gradient checkpointing only each layer's input plus one
  layer's worth; logits are counted separately (tokens x vocabulary, fp32 copies);
- KV cache: 2 x layers x KV heads x head size x tokens; the transformers actor holds its
  whole batch at once, vLLM pages it (it needs one group's sequences, and queues the rest);
- a fixed overhead per process (CUDA context, allocator slack, the interpreter and torch).
Prompt lengths are unknown before the data is read: ASSUMED_PROMPT_TOKENS stands in.
The estimates are deliberately a little generous (MARGIN); they gate, they do not schedule.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rlhfless.api.quantity import format_bytes, quantity_bytes
from rlhfless.model.reward_config import DEFAULT_TOKEN_BUDGET
from rlhfless.model.shape import GPT2, ModelShape

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ASSUMED_PROMPT_TOKENS = 128
MARGIN = 1.10
OVERHEAD = {"gpu": GIB, "cpu": 3 * GIB // 4}
# What one GPU offers when nothing better is known (A100/H100 80 GB); RLHFLESS_GPU_MEMORY or
# `--gpu-memory` (a quantity) says otherwise, and `rlhfless run` reads the local GPUs.
DEFAULT_GPU_MEMORY = 80 * GIB
GPU_MEMORY_ENV = "RLHFLESS_GPU_MEMORY"
# vLLM pre-allocates this share of each GPU (the rest stays free for other processes); the
# engine's own default, lowered by the local runtime's GPU pool when instances share a GPU.
VLLM_MEMORY_UTILIZATION = 0.85
# vLLM's default chunk of tokens per forward (its profiling run sizes activations with it).
VLLM_BATCHED_TOKENS = 8192


@dataclass(frozen=True)
class Workload:
    """What one instance of a stage does, in the numbers memory depends on."""

    role: str  # "generate" | "score" | "train" | "classify" (a reward model's scorer)
    engine: str = "transformers"  # generate: "transformers" | "vllm"
    trained: tuple[str, ...] = ()  # train: models with gradients ("policy", "critic")
    frozen: tuple[str, ...] = ()  # models held without gradients (reference, scorer)
    sequences: int = 1  # sequences in the largest forward (or KV cache)
    group_size: int = 1
    response_tokens: int = 1
    backend: str = "torch"
    zero_stage: int = 0
    ranks: int = 1  # data-parallel ranks the training state is sharded over
    checkpointing: bool = False
    cpu_offload: bool = False  # FSDP2: shards and optimizer step in host memory


@dataclass
class Estimate:
    """Bytes per device of one stage's instance, by part, against what it has."""

    stage: str
    device: str  # "gpu" | "cpu"
    parts: dict[str, float] = field(default_factory=dict)
    capacity: float = 0.0
    capacity_source: str = ""  # the field (or assumption) the capacity comes from

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def describe(self) -> str:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.parts.items() if v > 0)
        return f"~{format_bytes(self.total)} per {self.device} ({parts})"


# ---- the pieces ---------------------------------------------------------------------------
def weights_bytes(shape: ModelShape, dtype_bytes: int) -> float:
    return float(shape.params * dtype_bytes)


def kv_cache_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> float:
    return float(shape.kv_bytes_per_token(dtype_bytes) * tokens)


def training_state_bytes(
    params: int, dtype_bytes: int, backend: str, zero_stage: int, ranks: int
) -> dict[str, float]:
    """Weights, gradients, fp32 master copy and Adam moments per rank."""
    p = float(params)
    if backend == "fsdp":
        # FSDP2 over the ranks: fp32 master shards (a bf16 model is cast up), fp32 gradient
        # shards, fp32 moments; the bf16 compute copies are gathered unit by unit.
        n = max(1, ranks)
        return {"weights": 4 * p / n, "gradients": 4 * p / n, "optimizer": 8 * p / n}
    if backend != "deepspeed":
        # torch AdamW: gradients and both moments in the parameter dtype, nothing sharded.
        return {"weights": p * dtype_bytes, "gradients": p * dtype_bytes,
                "optimizer": 2 * p * dtype_bytes}
    n = max(1, ranks)
    shard = {name: (n if zero_stage >= level else 1)
             for name, level in (("optimizer", 1), ("gradients", 2), ("weights", 3))}
    # DeepSpeed accumulates gradients in fp32 under mixed precision and keeps an fp32 master
    # copy of the parameters from stage 1 on (for fp32 models too: its flat partition).
    master = 4 * p / shard["optimizer"] if (zero_stage >= 1 or dtype_bytes < 4) else 0.0
    return {
        "weights": p * dtype_bytes / shard["weights"],
        "gradients": 4 * p / shard["gradients"],  # fp32 (grad_accum_dtype under bf16)
        "master weights": master,
        "optimizer": 8 * p / shard["optimizer"],
    }


def gathered_bytes(shape: ModelShape, dtype_bytes: int) -> float:
    """What an FSDP2 rank holds unsharded while it computes: the root unit (embeddings, final
    norm, LM head) for the whole pass and two blocks (the running one, the next prefetched)."""
    root = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    if shape.family == GPT2:
        root += shape.max_positions * shape.hidden
    block = (shape.params - root) / max(1, shape.layers)
    return float((root + 2 * block) * dtype_bytes)


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int,
                     checkpointing: bool) -> float:
    """Activations kept for backward over `tokens` tokens (logits excluded)."""
    h, i = shape.hidden, shape.intermediate
    kv = shape.kv_heads * shape.head_dim
    mlp = 2 if shape.family == GPT2 else 4  # fc + act (GPT-2); gate, up, act, product
    per_token_layer = (8 * h + 2 * kv + mlp * i) * dtype_bytes
    if checkpointing:
        # Each layer keeps its input; one layer is recomputed at a time in backward.
        return float(tokens * (shape.layers * h * dtype_bytes + per_token_layer))
    return float(tokens * shape.layers * per_token_layer)


def forward_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> float:
    """Transient activations of a forward without gradients: about two layers' worth."""
    return float(2 * tokens * (4 * shape.hidden + 2 * shape.intermediate) * dtype_bytes)


def logits_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, backward: bool) -> float:
    """Logits of `tokens` positions: the LM head's output plus fp32 log-softmax (and, for
    training, the entropy's softmax and the gradients of both)."""
    copies = dtype_bytes + 4 + (8 if backward else 0)
    return float(tokens) * shape.vocab * copies


# ---- one stage --------------------------------------------------------------------------
def estimate(stage: str, device: str, shape: ModelShape, work: Workload, dtype_bytes: int,
             tensor_parallel: int = 1) -> Estimate:
    """Bytes per device of one instance of `stage` doing `work`."""
    est = Estimate(stage=stage, device=device)
    prompt = min(ASSUMED_PROMPT_TOKENS, max(1, shape.max_positions - work.response_tokens))
    sequence = prompt + work.response_tokens
    parts = est.parts
    if work.role == "generate":
        tp = max(1, tensor_parallel)
        parts["weights"] = weights_bytes(shape, dtype_bytes) / tp
        if work.engine == "vllm":
            # Paged: one group's sequences must fit; more only buys throughput.
            parts["kv cache"] = kv_cache_bytes(shape, work.group_size * sequence,
                                               dtype_bytes) / tp
            parts["activations"] = forward_bytes(shape, VLLM_BATCHED_TOKENS, dtype_bytes) / tp
        else:
            parts["kv cache"] = kv_cache_bytes(shape, work.sequences * sequence, dtype_bytes)
            parts["activations"] = forward_bytes(shape, work.sequences * prompt, dtype_bytes)
            parts["logits"] = logits_bytes(shape, work.sequences, dtype_bytes, backward=False)
    elif work.role == "score":
        tokens = work.sequences * work.response_tokens
        groups = max(1, work.sequences // max(1, work.group_size))
        parts["weights"] = weights_bytes(shape, dtype_bytes) * max(1, len(work.frozen))
        # The prompts' cache is gathered over each group's responses.
        parts["kv cache"] = kv_cache_bytes(shape, work.sequences * prompt + groups * prompt,
                                           dtype_bytes)
        parts["activations"] = forward_bytes(shape, tokens, dtype_bytes) \
            + float(tokens * shape.hidden * 4)
        parts["logits"] = logits_bytes(shape, tokens, dtype_bytes, backward=False)
    elif work.role == "train":
        sharded = work.backend == "fsdp"
        ranks = max(1, work.ranks) if sharded else 1
        # Offloaded shards (and the optimizer step) live in host memory: offload_estimate.
        offloaded = sharded and work.cpu_offload and device == "gpu"
        for model in work.trained:
            if offloaded:
                break
            state = training_state_bytes(shape.params, dtype_bytes, work.backend,
                                         work.zero_stage, work.ranks)
            for name, value in state.items():
                key = name if len(work.trained) == 1 else f"{name} ({model})"
                parts[key] = value
        # Compute in bf16 on GPUs when sharded (mixed precision), else in the stored dtype.
        compute = DTYPE_BYTES["bfloat16"] if sharded and device == "gpu" else dtype_bytes
        if sharded:
            parts["gathered weights"] = gathered_bytes(shape, compute)
        if work.frozen and not offloaded:
            parts["frozen weights"] = weights_bytes(shape, dtype_bytes) * len(work.frozen) \
                / ranks
        # Each rank takes its share of every mini-batch.
        sequences = math.ceil(work.sequences / ranks)
        groups = max(1, math.ceil(sequences / max(1, work.group_size)))
        tokens = sequences * work.response_tokens + groups * prompt
        parts["activations"] = activation_bytes(shape, tokens, compute, work.checkpointing)
        if "policy" in work.trained:
            parts["logits"] = logits_bytes(shape, sequences * work.response_tokens,
                                           compute, backward=True)
    elif work.role == "classify":
        # Packed forwards of at most `sequences` padded tokens (the scorer's token budget),
        # no gradients; the score head's output is one number per sequence (no logits).
        tokens = work.sequences
        parts["weights"] = weights_bytes(shape, dtype_bytes)
        parts["kv cache"] = kv_cache_bytes(shape, tokens, dtype_bytes)
        parts["activations"] = forward_bytes(shape, tokens, dtype_bytes) \
            + float(tokens * shape.hidden * 4)
    else:
        raise ValueError(f"unknown workload role {work.role!r}")
    parts["overhead"] = float(OVERHEAD[device])
    for key in parts:
        if key != "overhead":
            parts[key] *= MARGIN
    return est


def offload_estimate(stage: str, shape: ModelShape, work: Workload,
                     dtype_bytes: int) -> Estimate:
    """Host memory of a learner whose FSDP2 ranks offload (`trainer.cpuOffload`): every
    rank's shards of the training state and of the frozen models, in the one pod."""
    est = Estimate(stage=stage, device="host")
    for model in work.trained:
        state = training_state_bytes(shape.params, dtype_bytes, "fsdp", 0, 1)
        for name, value in state.items():
            key = name if len(work.trained) == 1 else f"{name} ({model})"
            est.parts[key] = value * MARGIN
    if work.frozen:
        est.parts["frozen weights"] = weights_bytes(shape, dtype_bytes) * len(work.frozen) \
            * MARGIN
    est.parts["overhead"] = float(OVERHEAD["cpu"] * max(1, work.ranks))
    return est


# ---- the job ------------------------------------------------------------------------------
def workloads(spec: Any) -> dict[str, Workload]:
    """What each deployed stage of a JobSpec does (stage roles come from the stage table)."""
    algo, gen, trainer = spec.algorithm, spec.generation, spec.trainer
    batch = spec.dataset.prompts_per_step * algo.group_size
    common = dict(group_size=algo.group_size, response_tokens=gen.max_new_tokens)
    table = spec.stages
    out: dict[str, Workload] = {}
    for stage in table:
        if not stage.deployed or not stage.holds:
            continue
        if stage.phase == "rollout":
            # The cost-aware planner may give one actor the whole batch.
            out[stage.name] = Workload("generate", engine=gen.engine, sequences=batch, **common)
        elif stage.phase == "score":
            out[stage.name] = Workload("score", frozen=stage.holds, sequences=batch, **common)
        else:
            trained = tuple(m for m in stage.holds if m != "reference")
            frozen = tuple(m for m in stage.holds if m == "reference")
            # `gpus: N > 1`: N FSDP2 ranks (rlhfless.train.ranks); else one rank, whose
            # DeepSpeed ZeRO shards nothing.
            ranks = stage.ranks
            out[stage.name] = Workload(
                "train", trained=trained, frozen=frozen,
                sequences=min(algo.mini_batch_size, batch),
                backend="fsdp" if ranks > 1 else trainer.backend,
                zero_stage=trainer.zero_stage, ranks=ranks,
                checkpointing=trainer.grad_checkpointing, cpu_offload=trainer.cpu_offload,
                **common)
    return out


def gpu_memory_bytes(override: str | None = None,
                     env: Mapping[str, str] | None = None) -> tuple[float, str]:
    """Memory of one GPU and where that number comes from."""
    env = os.environ if env is None else env
    if override:
        return float(quantity_bytes(override)), f"--gpu-memory {override}"
    if env.get(GPU_MEMORY_ENV):
        value = env[GPU_MEMORY_ENV]
        return float(quantity_bytes(value)), f"{GPU_MEMORY_ENV}={value}"
    return float(DEFAULT_GPU_MEMORY), \
        f"80Gi per GPU, assumed: set --gpu-memory or {GPU_MEMORY_ENV}"


def plan(spec: Any, shape: ModelShape, gpu_memory: tuple[float, str]) -> list[Estimate]:
    """One Estimate per deployed, model-holding stage of the job (and one of the host memory
    of a learner that offloads its shards)."""
    out, hosts = [], []
    store_bytes = DTYPE_BYTES["float32"] if spec.model.source == "tiny" \
        else DTYPE_BYTES[spec.model.dtype]
    for name, work in workloads(spec).items():
        stage = spec.stages[name]
        device = "gpu" if stage.gpus > 0 else "cpu"
        dtype_bytes = store_bytes
        if work.role == "generate" and work.engine == "vllm":
            dtype_bytes = DTYPE_BYTES["bfloat16"]  # the engine's dtype
        est = estimate(name, device, shape, work, dtype_bytes,
                       tensor_parallel=stage.gpus if work.engine == "vllm" else 1)
        if device == "gpu":
            capacity, source = gpu_memory
            if work.role == "generate" and work.engine == "vllm":
                capacity *= VLLM_MEMORY_UTILIZATION
                source = f"vLLM's gpu_memory_utilization {VLLM_MEMORY_UTILIZATION} of {source}"
            est.capacity, est.capacity_source = capacity, source
            if work.role == "train" and work.backend == "fsdp" and work.cpu_offload:
                host = offload_estimate(name, shape, work, dtype_bytes)
                memory = getattr(spec.resources, name).memory
                host.capacity = float(quantity_bytes(memory))
                host.capacity_source = f"resources.{name}.memory {memory}"
                hosts.append(host)
        else:
            memory = getattr(spec.resources, name).memory
            est.capacity = float(quantity_bytes(memory))
            est.capacity_source = f"resources.{name}.memory {memory}"
        out.append(est)
    return out + hosts


def scorer_workload(spec: Any) -> Workload:
    """The reward model's scorer: its largest forward, a token budget's worth (or the whole
    step's batch, when that is smaller)."""
    batch = spec.dataset.prompts_per_step * spec.algorithm.group_size
    sequence = ASSUMED_PROMPT_TOKENS + spec.generation.max_new_tokens
    return Workload("classify", frozen=("reward model",),
                    sequences=min(DEFAULT_TOKEN_BUDGET, batch * sequence),
                    group_size=spec.algorithm.group_size,
                    response_tokens=spec.generation.max_new_tokens)


def scorer_plan(spec: Any, shape: ModelShape, gpu_memory: tuple[float, str]) -> Estimate:
    """Bytes per device of one scorer instance holding the reward model of `shape` in the
    dtype `reward.model.dtype` names."""
    stage = spec.stages["scorer"]
    device = "gpu" if stage.gpus > 0 else "cpu"
    est = estimate("scorer", device, shape, scorer_workload(spec),
                   DTYPE_BYTES[spec.reward.model.dtype])
    if device == "gpu":
        est.capacity, est.capacity_source = gpu_memory
    else:
        memory = spec.resources.scorer.memory
        est.capacity = float(quantity_bytes(memory))
        est.capacity_source = f"resources.scorer.memory {memory}"
    return est


def _advice(spec: Any, est: Estimate) -> list[str]:
    """The fields that shrink the biggest parts of an estimate."""
    name = est.stage
    fields = [f"resources.{name}.memory"] if est.device in ("cpu", "host") else []
    if name == "scorer":
        if spec.reward.model.dtype == "float32":
            fields.append("reward.model.dtype: bfloat16")
        return fields + ["reward.model (a smaller one)"]
    role = workloads(spec)[name].role
    if role == "generate" and spec.generation.engine == "vllm":
        fields.append(f"resources.{name}.gpus (tensor parallelism)")
    big = sorted(est.parts, key=lambda k: -est.parts[k])[:2]
    for part in big:
        if part.startswith(("weights", "gradients", "optimizer", "master", "frozen")):
            if role == "train" and est.device == "gpu":
                work = workloads(spec)[name]
                if work.ranks < 8:
                    fields.append(f"resources.{name}.gpus (FSDP2 shards the training "
                                  "state over them)")
                if work.ranks > 1 and not work.cpu_offload:
                    fields.append("trainer.cpuOffload: true")
            fields.append("model (a smaller one)")
        if part.startswith("activations") and role == "train" \
                and not spec.trainer.grad_checkpointing:
            fields.append("trainer.gradCheckpointing: true")
        if part.startswith(("activations", "logits")):
            fields.append("algorithm.miniBatchSize" if role == "train"
                          else "dataset.promptsPerStep")
            fields.append("generation.maxNewTokens")
        if part == "kv cache":
            fields += ["dataset.promptsPerStep", "algorithm.groupSize",
                       "generation.maxNewTokens"]
    return list(dict.fromkeys(fields))


def fit_errors(spec: Any, estimates: list[Estimate]) -> list[str]:
    """One message per stage that cannot fit: stage, estimate, capacity, fields to change."""
    errors = []
    for est in estimates:
        if est.fits:
            continue
        errors.append(
            f"resources.{est.stage}: the {est.stage} needs {est.describe()} but has "
            f"{format_bytes(est.capacity)} ({est.capacity_source}); change "
            + ", ".join(_advice(spec, est)))
    return errors


def tensor_parallel_errors(spec: Any, shape: ModelShape) -> list[str]:
    """vLLM's rule: N divides the attention heads, and N divides the KV heads or is a
    multiple of them (then each KV head is replicated)."""
    errors = []
    for stage in spec.stages:
        if not stage.deployed or stage.phase != "rollout" or stage.gpus <= 1 \
                or spec.generation.engine != "vllm":
            continue
        n, field = stage.gpus, f"resources.{stage.name}.gpus"
        if shape.heads % n:
            errors.append(f"{field}: tensor parallelism over {n} GPUs must divide the "
                          f"model's {shape.heads} attention heads")
        elif shape.kv_heads % n and n % shape.kv_heads:
            errors.append(f"{field}: tensor parallelism over {n} GPUs must divide the "
                          f"model's {shape.kv_heads} KV heads (or be a multiple of them)")
    return errors


def placement_warnings(spec: Any) -> list[str]:
    """GPUs a job asks for that its stages will not use (billed all the same)."""
    return [f"resources.{stage.name}.gpus: {stage.gpus} GPUs, but the transformers engine "
            "generates on one (tensor parallelism needs generation.engine: vllm)"
            for stage in spec.stages
            if stage.deployed and stage.phase == "rollout" and stage.gpus > 1
            and spec.generation.engine != "vllm"]

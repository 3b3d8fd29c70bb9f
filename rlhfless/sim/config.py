"""One simulated job: cluster, model, algorithm, batch, and the physics built from them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from rlhfless.api.spec import SchedulingSpec
from rlhfless.scheduling.scaling import TIME_SLACK
from rlhfless.sim.costmodel import (
    AffineDecode,
    Prefill,
    RooflineDecode,
    compute_time,
    forward_flops,
    group_forward_flops,
    kv_capacity_tokens,
    learner_bytes_per_gpu,
    learner_fits,
    load_profile,
)
from rlhfless.sim.engine import Engine
from rlhfless.sim.hardware import COLD_STARTS, GPUS, MODELS, Efficiency, Overheads


@dataclass(frozen=True)
class SimConfig:
    gpu: str = "h100"
    nodes: int = 20
    model: str = "7b"
    algo: str = "grpo"  # "grpo" | "ppo" (PPO adds a critic of the same size)
    prompts_per_step: int = 256
    group_size: int = 16
    ppo_epochs: int = 1
    max_seqs: int = 1024  # vLLM max_num_seqs (verl's rollout default)
    # verl colocates vLLM with the FSDP trainer: its config default gives vLLM
    # gpu_memory_utilization=0.5 and its example GRPO/PPO scripts use 0.6; a dedicated actor
    # function can use vLLM's own default, 0.9.
    colocated_mem_util: float = 0.6
    dedicated_mem_util: float = 0.9
    prefix_cache: bool = True  # vLLM automatic prefix caching, on in both systems
    eff: Efficiency = field(default_factory=Efficiency)
    over: Overheads = field(default_factory=Overheads)
    profile: str | None = None  # measured profile JSON replacing the decode roofline
    # "roofline": decode time grows with the KV cache read (context); "batch-only": the
    # roofline fitted to tpot = a + b·batch at a fixed context per sequence (what a tpot(batch)
    # profile, as in the scheduler's Profile, assumes) — to see what that assumption changes.
    decode_law: str = "roofline"
    batch_only_ctx: float = 2000.0
    # "quota": the job may hold at most the baseline's GPUs at any moment (the headline);
    # "shared": functions start on free GPUs of a larger serverless pool (prewarm never waits).
    pool: str = "quota"
    sched: SchedulingSpec = field(default_factory=SchedulingSpec)
    fuse_threshold: float = 0.2  # RLHFuse: migrate when this fraction of samples remains
    # RLHFless variants (see sim.policies and sim.actors): what the planner is fed
    # ("kv-aware" = max-length predictor + context term, the scheduling defaults; "mean" =
    # the longest sample planned as the mean, no context term), and how cut-and-migrate runs
    # ("stream" = per-actor hand-off cut; "global" = one cut, no barrier; "barrier" = every
    # actor returns at its cut, the tail waits for the last one).
    planner_inputs: str = "kv-aware"
    cut_mode: str = "stream"
    # The step: "stream" = groups flow to one fused learner as they finish, one optimizer step
    # at the end; "barrier" = rollout, then reference (+critic), then trainer (three barriers,
    # three functions).
    step_mode: str = "stream"
    # The streaming step's planner (`plan_step`, as the driver's planner calls it): split
    # groups too long for one actor over several, plan every actor as if it may hold the
    # batch's longest sample, and trade λ only among plans within `time_slack` of the fastest.
    # Switches for the ablation; the driver has no spec field for them.
    split_groups: bool = True
    runaway_floor: bool = True
    time_slack: float | None = TIME_SLACK
    cold_start: str = "node-cache"  # a key of hardware.COLD_STARTS (see `with_cold_start`)
    learner_gpu_step: int = 4  # learner sizes are multiples of this many GPUs
    # The learner recomputes the old (behaviour) log-probs in a forward pass of its own, as
    # verl does; exactly on-policy with one optimizer step they equal the fwd/bwd pass's own.
    learner_logprob_pass: bool = True
    seed: int = 0

    def with_(self, **kw) -> SimConfig:
        return replace(self, **kw)

    def with_cold_start(self, name: str) -> SimConfig:
        """Use a cold-start variant (init seconds for actor and learner, load bandwidth)."""
        v = COLD_STARTS[name]
        return replace(self, cold_start=name, over=replace(
            self.over, actor_init_s=v.init_s, learner_init_s=v.init_s))

    # ---- derived ---------------------------------------------------------------------------
    @cached_property
    def hw(self):
        return GPUS[self.gpu]

    @cached_property
    def shape(self):
        return MODELS[self.model]

    @property
    def gpus(self) -> int:
        return self.nodes * self.hw.gpus_per_node

    @property
    def tp(self) -> int:
        return self.shape.tp

    @property
    def max_replicas(self) -> int:
        return self.gpus // self.tp

    @property
    def load_bw(self) -> float:
        return self.hw.load_bw * COLD_STARTS[self.cold_start].load_bw_scale

    @property
    def critic(self) -> bool:
        return self.algo == "ppo"

    @cached_property
    def decode(self):
        if self.profile:
            return load_profile(self.profile).decode
        roof = RooflineDecode(self.hw, self.shape, self.tp, self.eff)
        if self.decode_law == "batch-only":
            batches = np.array([1, 8, 32, 128, 256, 512], dtype=float)
            t = [roof.iter_time(int(b), b * self.batch_only_ctx) for b in batches]
            slope, intercept = np.polyfit(batches, t, 1)
            return AffineDecode(float(intercept), float(slope), 0.0)
        return roof

    @cached_property
    def prefill(self) -> Prefill:
        rate = load_profile(self.profile).prefill_tok_per_s if self.profile else None
        return Prefill(self.hw, self.shape, self.tp, self.eff, rate)

    def engine(self, eid: int, start: float, mem_util: float) -> Engine:
        cap = kv_capacity_tokens(self.hw, self.shape, self.tp, mem_util)
        return Engine(eid, self.decode, self.prefill, cap, self.max_seqs, self.prefix_cache, start)

    # ---- phase costs -----------------------------------------------------------------------
    def forward_s(self, prompt_len, lengths, dedup: bool, gpus: int, models: int = 1) -> float:
        """`models` forward passes (policy, reference, critic…) over the batch on `gpus`."""
        flops = models * forward_flops(self.shape, prompt_len, lengths, dedup)
        return compute_time(flops, gpus, self.hw, self.eff.fwd_mfu)

    def train_s(self, prompt_len, lengths, dedup: bool, gpus: int) -> float:
        """fwd+bwd (3× forward FLOPs) per PPO epoch, for the policy and the critic (PPO)."""
        models = 2 if self.critic else 1
        flops = 3.0 * self.ppo_epochs * models * forward_flops(
            self.shape, prompt_len, lengths, dedup
        )
        return compute_time(flops, gpus, self.hw, self.eff.train_mfu)

    def actor_load_s(self) -> float:
        """Weights of one actor instance from the node-local cache (per GPU, in parallel)."""
        return self.shape.weight_bytes / self.tp / self.load_bw

    def learner_load_s(self, gpus: int) -> float:
        return learner_bytes_per_gpu(self.shape, gpus, self.critic) / self.load_bw

    def reference_load_s(self, gpus: int) -> float:
        models = 2 if self.critic else 1  # reference (+ critic) weights, sharded
        return models * self.shape.weight_bytes / gpus / self.load_bw

    # ---- the fused learner (streaming step) ---------------------------------------------
    def learner_gpu_s(self, prompt_len, lengths, dedup: bool) -> np.ndarray:
        """GPU-seconds of the fused learner per group: reference forward (+ critic values),
        the old log-prob forward if `learner_logprob_pass`, and forward/backward of the policy
        (+ critic). prompt_len [n], lengths [n, G]."""
        fwd = group_forward_flops(self.shape, prompt_len, lengths, dedup)
        peak = self.hw.flops
        fwd_models = (1 + (1 if self.learner_logprob_pass else 0)
                      + (1 if self.critic else 0))  # reference, old log-probs, values
        train_models = 2 if self.critic else 1
        return (fwd_models * fwd / (peak * self.eff.fwd_mfu)
                + 3.0 * self.ppo_epochs * train_models * fwd / (peak * self.eff.train_mfu))

    def learner_min_gpus(self) -> int:
        step = self.learner_gpu_step
        for n in range(step, 100 * self.gpus + 1, step):
            if learner_fits(self.hw, self.shape, n, self.critic):
                return n
        raise ValueError(f"the {self.shape.name} learner fits no GPU count")

    def learner_finish_s(self, gpus: int) -> float:
        """After the last group: reduce the accumulated gradients (ring reduce-scatter of bf16
        grads), one optimizer step (16 bytes/param read and written, sharded), write the
        optimizer state to host memory for the next step's instance, publish v+1."""
        models = 2 if self.critic else 1
        p = models * self.shape.params
        bw = self.hw.inter_bw if gpus > self.hw.gpus_per_node else self.hw.intra_bw
        reduce = 2.0 * p * (gpus - 1) / gpus / bw
        optim = 2.0 * 16.0 * p / gpus / (self.hw.hbm_bw * self.eff.decode_bw)
        save = 16.0 * p / gpus / self.load_bw
        return reduce + optim + save + self.publish_s()

    def reshard_s(self) -> float:
        """verl: gather FSDP shards into the rollout's TP layout, in GPU memory."""
        bw = self.hw.inter_bw if self.nodes > 1 else self.hw.intra_bw
        return self.shape.weight_bytes / self.tp / bw

    def publish_s(self) -> float:
        """Trainer pushes the new version to every node's local cache (pipelined broadcast)."""
        node_bw = self.hw.inter_bw * self.hw.gpus_per_node
        return self.over.publish_fixed_s + self.shape.weight_bytes / node_bw

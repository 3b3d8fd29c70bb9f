"""The driver: one synchronous RL step at a time, as a short list of calls.

    plan → rollout → score → advantages → train → record

It knows the runtime interface, not Knative or processes; the scheduling policies are pure
functions behind `Planner`; the math lives in `rlhfless.algo`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from rlhfless.api.spec import RLHFJob
from rlhfless.checkpoint import CHECKPOINT_FILE, Checkpoint, load_checkpoint, save_checkpoint
from rlhfless.functions.train_state import prune_optimizer_states
from rlhfless.learn import build_train_request, needs_reference, score_payloads
from rlhfless.model.tokenizer import load_tokenizer
from rlhfless.planner import Planner
from rlhfless.records import (
    BusyInterval,
    MetricsLog,
    StepRecord,
    cost_by_stage,
    idle_ratios,
)
from rlhfless.rewards.datasets import batch_for_step, chat_messages, load_dataset, reward_meta
from rlhfless.rollout import (
    PromptItem,
    RolloutResult,
    RolloutSettings,
    invoke_timed,
    run_rollout,
)
from rlhfless.runtime.base import Runtime
from rlhfless.scheduling.prewarm import PrewarmPlan
from rlhfless.tracking import open_sinks
from rlhfless.weights import WeightStore, materialize_base

log = logging.getLogger("rlhfless.driver")
StepCallback = Callable[[StepRecord], Awaitable[None] | None]
SCORING_STAGES = ("reference", "reward", "critic")
TIMING_KEYS = {"reference": "ref", "trainer": "update_actor"}
# Order of each stage's phase within a step (rollout → score → train).
PHASE_OF = {"actor": 0, "rollout": 0, "reference": 1, "reward": 1, "critic": 1, "score": 1,
            "trainer": 2, "train": 2}


def _log_prewarm_failure(task: asyncio.Future[None]) -> None:
    """A failed prewarm only costs a cold start later (the request starts one on demand)."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("prewarm failed: %s", task.exception())


def _work_seconds(rollout: RolloutResult, scores: dict[str, dict], train_reply: dict
                  ) -> dict[str, float]:
    """Seconds each phase spent inside functions (cold starts excluded): what prewarm plans."""
    return {
        "rollout": sum(rollout.round_work_s),
        "score": max((float(r.get("stats", {}).get("function_s", 0.0)) for r in scores.values()),
                     default=0.0),
        "train": float(train_reply.get("stats", {}).get("function_s", 0.0)),
    }


class Driver:
    def __init__(self, job: RLHFJob, runtime: Runtime, run_dir: Path,
                 store_dir: Path | None = None):
        self.job = job
        self.spec = job.spec
        self.runtime = runtime
        self.run_dir = Path(run_dir)
        self.store = WeightStore(store_dir or self.run_dir / "store")
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl")
        self.checkpoint = load_checkpoint(self.run_dir) or Checkpoint()
        self.planner = Planner(self.spec, self.checkpoint.scheduler)
        self._tokenizer = None
        self._dataset: list[dict] | None = None

    @property
    def completed_steps(self) -> int:
        return self.checkpoint.step

    # -- the loop ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None,
                  on_step: StepCallback | None = None) -> int:
        """Run until spec.steps are done or `stop` is set (checked between steps)."""
        # Loading a model (materialising v0) is blocking work: keep the event loop free
        # (the operator runs this driver inside kopf's loop).
        await asyncio.to_thread(self._prepare)
        try:
            while self.checkpoint.step < self.spec.steps:
                if stop is not None and stop.is_set():
                    break
                record = await self.step(self.checkpoint.step + 1)
                if on_step is not None:
                    result = on_step(record)
                    if inspect.isawaitable(result):
                        await result
        finally:
            self.metrics_log.close()  # flush the trackers, however the run ends
        await self._scale_all(0)
        return self.checkpoint.step

    def _prepare(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.store.versions():
            materialize_base(self.spec.model, self.store)
        # A step that ran but was never checkpointed is redone: forget its traces.
        self.metrics_log.truncate_after(self.checkpoint.step)
        self._tokenizer = load_tokenizer(self.store.base_dir / "tokenizer")
        self._dataset = load_dataset(self.spec.dataset, self.spec.reward)
        self.metrics_log.sinks = open_sinks(self.spec.logging, self.job.metadata.name,
                                            self.run_dir, self.checkpoint.step)

    async def step(self, step: int) -> StepRecord:
        t0 = time.time()
        busy: list[BusyInterval] = []
        timings: dict[str, float] = {}
        version = self.checkpoint.weights_version
        prefix = f"{self.job.metadata.name}-s{step}"
        items = await asyncio.to_thread(self._prompt_items, step)
        prewarm = self.planner.prewarm() if self.spec.scheduling.prewarm else None
        last = step == self.spec.steps

        # 1. plan
        plan = self.planner.plan(items, warm_actors=self._alive("actor"))
        await self.runtime.scale("actor", plan.n_actors)

        # 2. rollout
        async with self._phase("rollout", prewarm, last):
            started = time.time()
            rollout = await run_rollout(
                self.runtime, items, plan.bins, version, self._rollout_settings(step),
                prefix, busy, self.planner.migration_bins,
            )
            timings["gen"] = time.time() - started

        # 3. score (reference, reward and critic run side by side)
        async with self._phase("score", prewarm, last):
            payloads = await asyncio.to_thread(
                score_payloads, self.spec, items, rollout.samples, version, prefix,
                self._tokenizer)
            results = await asyncio.gather(*(
                invoke_timed(self.runtime, stage, payload, busy)
                for stage, payload in payloads.items()
            ))
            scores = dict(zip(payloads, results, strict=True))

        # 4. advantages, 5. train
        async with self._phase("train", prewarm, last):
            request, learn_stats = await asyncio.to_thread(
                build_train_request, self.spec, items, rollout.samples, scores, version,
                f"{prefix}-train")
            reply = await invoke_timed(self.runtime, "trainer", request, busy)
        # verl-comparable names; each scoring stage and the trainer run once a step.
        timings.update({TIMING_KEYS.get(b.stage, b.stage): b.end - b.start
                        for b in busy if b.stage != "actor"})
        new_version = int(reply["weights_version"])

        # 6. record
        t1 = time.time()
        usages = self.runtime.meter()
        costs = cost_by_stage(usages, t0, t1)
        gpu_s = {stage: c.gpu_seconds for stage, c in costs.items()}
        work_s = _work_seconds(rollout, scores, reply)
        sched = self.planner.observe(items, rollout, usages, work_s, t0)
        tokens = sum(len(s.response) for group in rollout.samples.values() for s in group)
        metrics: dict[str, float] = {
            **{f"timing_s/{k}": v for k, v in timings.items()},
            "timing_s/step": t1 - t0,
            "timing_s/in_functions": sum(work_s.values()),
            "perf/throughput": tokens / max(t1 - t0, 1e-9),
            "perf/total_response_tokens": float(tokens),
            "perf/prefill_tokens_saved": sum(
                float(st.get("prefill_tokens_saved", 0)) for st in rollout.actor_stats
            ) + sum(float(r.get("stats", {}).get("prefill_tokens_saved", 0))
                    for r in scores.values()),
            "cost/gpu_seconds": sum(gpu_s.values()),
            "cost/cold_start_gpu_seconds": sum(c.cold_gpu_seconds for c in costs.values()),
            **{f"cost/gpu_seconds/{k}": v for k, v in gpu_s.items()},
            **{f"idle_ratio/{k}": v for k, v in idle_ratios(usages, busy, t0, t1).items()},
            **learn_stats,
            **plan.decisions,
            **sched,
            **{f"train/{k}": float(v) for k, v in reply.get("stats", {}).items()},
        }
        self.checkpoint = Checkpoint(
            step=step,
            weights_version=new_version,
            scheduler=self.planner.state_dict(),
            gpu_seconds_total=self.checkpoint.gpu_seconds_total + metrics["cost/gpu_seconds"],
        )
        record = StepRecord(
            step=step, metrics=metrics, reward_mean=learn_stats["reward/mean"],
            gpu_seconds_total=self.checkpoint.gpu_seconds_total, weights_version=new_version,
            checkpoint=str(self.run_dir / CHECKPOINT_FILE),
            timeline=[{"stage": u.stage, "instance": u.instance, "start": u.started_at - t0,
                       "end": (u.ended_at or t1) - t0, "cold_start": u.cold_start_s}
                      for u in usages if (u.ended_at or t1) > t0],
        )
        self.metrics_log.append(record)
        if step % self.spec.checkpoint.every_steps == 0 or step == self.spec.steps:
            save_checkpoint(self.run_dir, self.checkpoint)
            self._prune_versions(new_version)
        return record

    @contextlib.asynccontextmanager
    async def _phase(self, phase: str, prewarm: PrewarmPlan | None,
                     last_step: bool = False) -> AsyncIterator[None]:
        """Prewarm stages due during `phase`; release the phase's stages when it ends."""
        pending: dict[str, asyncio.Task[None]] = {}
        if prewarm is not None:
            for stage, start_phase in prewarm.start_phase.items():
                if start_phase == phase and self._instances_wanted(stage) and not (
                    last_step and PHASE_OF[stage] <= PHASE_OF.get(phase, 0)
                ):  # nothing to prewarm for a step that will not run
                    pending[stage] = asyncio.create_task(
                        self._start_later(stage, prewarm.start_offsets[stage]))
        try:
            yield
        finally:
            if prewarm is not None:
                for stage in prewarm.scale_to_zero_after.get(phase, []):
                    if stage not in pending:  # being prewarmed for its next turn: keep it
                        await self.runtime.scale(stage, 0)
            for stage, task in pending.items():
                if task.done() or not task.cancel():
                    continue
                # Still waiting for its moment: the phase it prewarms for is next, start now.
                pending[stage] = asyncio.create_task(self._start_later(stage, 0.0))
            await asyncio.gather(*pending.values(), return_exceptions=True)

    async def _start_later(self, stage: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        # Once started, a cold start runs to the end even if its phase closes meanwhile.
        start = asyncio.ensure_future(self.runtime.scale(stage, self._instances_wanted(stage)))
        start.add_done_callback(_log_prewarm_failure)
        await asyncio.shield(start)

    def _instances_wanted(self, stage: str) -> int:
        if stage == "actor":
            return self.planner.last_plan.n_actors if self.planner.last_plan else 1
        if stage == "reference":
            return int(needs_reference(self.spec))
        if stage == "critic":
            return int(self.spec.algorithm.name == "ppo")
        return 1

    def _alive(self, stage: str) -> int:
        return sum(1 for u in self.runtime.meter() if u.stage == stage and u.ended_at is None)

    # -- helpers -------------------------------------------------------------------------
    def _prompt_items(self, step: int) -> list[PromptItem]:
        assert self._dataset is not None and self._tokenizer is not None
        rows = batch_for_step(self._dataset, step - 1, self.spec.dataset.prompts_per_step,
                              self.spec.seed)
        items = []
        for row in rows:
            text = self._tokenizer.render_chat(chat_messages(row, self.spec.dataset.system_prompt))
            items.append(PromptItem(key=str(row["id"]), text=row["prompt"],
                                    prompt_ids=self._tokenizer.encode(text),
                                    meta=reward_meta(row)))
        return items

    def _rollout_settings(self, step: int) -> RolloutSettings:
        gen, sched = self.spec.generation, self.spec.scheduling
        return RolloutSettings(
            group_size=self.spec.algorithm.group_size,
            max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            seed=self.spec.seed * 1_000_003 + step,
            cut_fraction=sched.tau if sched.cut_migrate and sched.tau < 1 else None,
        )

    async def _scale_all(self, n: int) -> None:
        for stage in ("actor", *SCORING_STAGES, "trainer"):
            if self._instances_wanted(stage):  # stages this job never deploys are left alone
                await self.runtime.scale(stage, n)

    def _prune_versions(self, current: int) -> None:
        keep = self.spec.checkpoint.keep
        # Version 0 is the reference policy: it stays for the whole job.
        for v in self.store.versions():
            if 0 < v <= current - keep:
                shutil.rmtree(self.store.path(v), ignore_errors=True)
        prune_optimizer_states(self.store, set(self.store.versions()))

"""The driver loop: one synchronous RL step at a time, as a short list of calls.

    plan → begin learner ║ rollout ═► each finished group: reward → shard → learner add
                                     (while the other actors still generate)
         → finish (one optimizer step, weights v+1) → record

It knows the runtime interface, not Knative or processes; the scheduling policies are pure
functions behind `Planner`; the math lives in `rlhfless.algo` and `rlhfless.train` (inside
the learner function); which stages exist comes from the job's stage table. With
`scheduling.streaming: false` the same calls run as barriers (the comparison baseline).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rlhfless.api.spec import RLHFJob
from rlhfless.cost import (
    BudgetCheck,
    Ledger,
    check_budget,
    job_cost_warnings,
    job_prices,
    planned_cost,
)
from rlhfless.driver.learn import INLINE_LIMIT_BYTES, StepLearning
from rlhfless.driver.metrics import (
    StepTrace,
    requests_timeline,
    step_metrics,
    timeline,
    work_seconds,
)
from rlhfless.driver.planner import Planner
from rlhfless.driver.prewarm import PhasePrewarmer
from rlhfless.driver.records import BusyInterval, MetricsLog, StepRecord
from rlhfless.driver.rollout import PromptItem, RolloutSettings, StreamingRollout
from rlhfless.driver.tracking import open_sinks
from rlhfless.model.materialize import materialize_base
from rlhfless.model.tokenizer import load_tokenizer
from rlhfless.rewards.datasets import batch_for_step, chat_messages, load_dataset, reward_meta
from rlhfless.runtime.base import Runtime
from rlhfless.store import (
    CHECKPOINT_FILE,
    Checkpoint,
    ShardStore,
    WeightStore,
    load_checkpoint,
    prune_history,
    recover,
    save_checkpoint,
)

log = logging.getLogger("rlhfless.driver")
StepCallback = Callable[[StepRecord], Awaitable[None] | None]


class Driver:
    def __init__(self, job: RLHFJob, runtime: Runtime, run_dir: Path,
                 store_dir: Path | None = None, inline_limit: int = INLINE_LIMIT_BYTES):
        self.job = job
        self.spec = job.spec
        self.runtime = runtime
        self.run_dir = Path(run_dir)
        self.store = WeightStore(store_dir or self.run_dir / "store")
        self.shards = ShardStore(self.store.root)
        self.inline_limit = inline_limit
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl")
        self.checkpoint = load_checkpoint(self.run_dir) or Checkpoint()
        self.saved_step = self.checkpoint.step  # the last step on disk (where a resume starts)
        self.planner = Planner(self.spec, self.checkpoint.scheduler)
        self.prices = job_prices(self.spec)
        self.ledger = Ledger()
        self.budget = BudgetCheck()  # exceeded: run() stops before the next step
        self._tokenizer = None
        self._dataset: list[dict] | None = None
        self._prepared = False

    @property
    def completed_steps(self) -> int:
        return self.checkpoint.step

    # -- the loop ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None,
                  on_step: StepCallback | None = None) -> int:
        """Run until spec.steps are done, `stop` is set (checked between steps) or the next
        step would exceed spec.budget (`self.budget` says so; the last step is checkpointed)."""
        # Loading a model (materialising v0) is blocking work: keep the event loop free.
        await asyncio.to_thread(self.prepare)
        try:
            while self.checkpoint.step < self.spec.steps:
                if (stop is not None and stop.is_set()) or self.budget.exceeded:
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

    def prepare(self, command: str = "") -> str | None:
        """Check the checkpoint's weights, materialise the base model, load the tokenizer and
        the dataset, open the trackers, total the spend so far (once, before `step`).

        Returns a notice when the current weights version was corrupt and the run fell back
        to an older checkpoint (`store.recover`; `command` names the job for the message).
        """
        if self._prepared:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        recovery = recover(self.run_dir, self.store, command)
        if recovery.notice is not None and recovery.checkpoint is not None:
            self.checkpoint = recovery.checkpoint
            self.saved_step = self.checkpoint.step
            self.planner = Planner(self.spec, self.checkpoint.scheduler)
        materialize_base(self.spec.model, self.store)  # once; later a check that it matches
        # A step that ran but was never checkpointed is redone: forget its traces.
        self.metrics_log.truncate_after(self.checkpoint.step)
        self._tokenizer = load_tokenizer(self.store.base_dir / "tokenizer")
        self._dataset = load_dataset(self.spec.dataset, self.spec.reward)
        self.metrics_log.sinks = open_sinks(self.spec.logging, self.job.metadata.name,
                                            self.run_dir, self.checkpoint.step)
        self.ledger = Ledger.of(self.metrics_log.read())
        self.budget = check_budget(self.ledger, self.spec.budget)
        for warning in job_cost_warnings(self.spec):
            log.warning("%s", warning)
        self._prepared = True
        return recovery.notice

    async def step(self, step: int) -> StepRecord:
        t0 = time.time()
        busy: list[BusyInterval] = []
        version = self.checkpoint.weights_version
        prefix = f"{self.job.metadata.name}-s{step}"
        items = await asyncio.to_thread(self._prompt_items, step)
        phases = PhasePrewarmer(
            self.runtime, self.planner.prewarm() if self.spec.scheduling.prewarm else None,
            self._instances_wanted, last_step=step == self.spec.steps)

        plan = self.planner.plan(items, warm_actors=self._alive("actor"))
        await self.runtime.scale("actor", plan.n_actors)
        # Append-only store: a version left by a step that never reached its checkpoint
        # keeps its number; this step publishes the next free one.
        new_version = max(self.store.next_version(), version + 1)
        learn = StepLearning(self.runtime, self.spec, self.shards, self._tokenizer, items, step,
                             version, prefix, busy, self.inline_limit, new_version)
        rollout = StreamingRollout(self.runtime, items, plan.bins, version,
                                   self._rollout_settings(step), prefix, busy, learn.submit)
        try:
            async with phases.phase("rollout"):  # groups already flow to the learner
                learn.start()
                rolled = await rollout.run()
            async with phases.phase("learn"):  # the last groups, then one optimizer step
                learned = await learn.finish()
        except BaseException:
            await learn.abort()
            raise

        trace = StepTrace(t0, time.time(), busy, self.runtime.meter(), rolled, learned)
        sched = self.planner.observe(items, rolled, trace.usages, work_seconds(trace), t0,
                                     learned.reply.get("stats", {}))
        metrics = step_metrics(trace, plan.decisions, sched, prices=self.prices)
        return self._record(step, trace, metrics, int(learned.reply["weights_version"]))

    def _record(self, step: int, trace: StepTrace, metrics: dict[str, Any],
                new_version: int) -> StepRecord:
        """Append the step to metrics.jsonl; checkpoint (and prune old versions) when due."""
        self.checkpoint = Checkpoint(
            step=step,
            weights_version=new_version,
            scheduler=self.planner.state_dict(),
            gpu_seconds_total=self.checkpoint.gpu_seconds_total + metrics["cost/gpu_seconds"],
        )
        record = StepRecord(
            step=step, metrics=metrics, reward_mean=metrics["reward/mean"],
            gpu_seconds_total=self.checkpoint.gpu_seconds_total, weights_version=new_version,
            checkpoint=str(self.run_dir / CHECKPOINT_FILE),
            timeline=timeline(trace.usages, trace.t0, trace.t1),
            requests=requests_timeline(trace.busy, trace.t0, trace.t1),
        )
        self.metrics_log.append(record)
        self.ledger.add(metrics)
        self.ledger.planned = self._planned_next(step, metrics)
        self.budget = check_budget(self.ledger, self.spec.budget)
        due = step % self.spec.checkpoint.every_steps == 0 or step == self.spec.steps
        if due or self.budget.exceeded:  # a budget stop resumes exactly here
            save_checkpoint(self.run_dir, self.checkpoint)
            self.saved_step = step
            self.store.prune(new_version, self.spec.checkpoint.keep)
            prune_history(self.run_dir, set(self.store.versions()))
            self.shards.prune(step + 1)  # a checkpointed step is never re-sent
        return record

    def _planned_next(self, step: int,
                      metrics: dict[str, Any]) -> tuple[float, float | None] | None:
        """The next step's cost from its plan (a budgeted job's forecast; None without one)."""
        if not self.spec.budget.limited or step >= self.spec.steps:
            return None
        chosen = metrics.get(f"sched/table/n{int(metrics.get('sched/actors', 0))}/gpu_seconds")
        if not chosen:
            return None
        upcoming = self.planner.next_step_gpu_seconds(self._prompt_items(step + 1),
                                                      warm_actors=self._alive("actor"))
        return planned_cost(upcoming, chosen, metrics["cost/gpu_seconds"],
                            metrics.get("cost/dollars"))

    def _instances_wanted(self, stage: str) -> int:
        if not self.spec.stages.has(stage):
            return 0
        if stage == "actor":
            return self.planner.last_plan.n_actors if self.planner.last_plan else 1
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
                                    meta=reward_meta(row),
                                    max_new_tokens=row.get("max_new_tokens")))
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
        for stage in self.spec.stages.deployed:
            await self.runtime.scale(stage, n)

"""RLHFless in the cluster model, step by step as the driver runs it.

    plan      predict each group's mean and longest sample → choose N actors (cost-aware)
              → assign groups to bins → size and start the learner (`plan_learner`)
    rollout   N actor functions; each is cut once a fraction τ of its samples is done and
              hands its unfinished samples (prompt + partial response, re-prefilled) to the
              running actor with the fewest samples in flight, then scales down at once
              (`cut_mode`, see sim.actors); an actor with nothing left is scaled down at once
    stream    (`step_mode="stream"`, default) each group, when its G samples are done, is
              reported, scored by the reward function and sent to ONE fused learner
              (reference log-probs + critic values + forward/backward; gradients accumulate),
              which processes groups first come first served; ONE optimizer step after the
              last group, then weights v+1 are published
    barrier   (`step_mode="barrier"`) rollout, then reference (+critic) on all GPUs, then the
              trainer (old log-probs + update) on all GPUs: three functions, three barriers

Billing (`rlhfless.scheduling.cost`): every instance from its start (cold start included) to
its release plus `scale_down_s` (pod termination). Next step's actors are prewarmed during this
step's tail (their init ends as weights v+1 are published, then they load them) or kept alive
when that is cheaper (`keep_or_prewarm`); their time before the next step is billed to the
next step, whose instances they are.

pool="quota" (the headline): the job never holds more GPUs than the baseline reserves; an
instance that would exceed it starts when GPUs are released, and an actor stays alive for
the next step only where the quota has room. pool="shared": instances start
on free GPUs of a larger pool whenever asked (peak GPUs reported).

All decisions are the real `rlhfless.scheduling` functions, called through `sim.policies`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from rlhfless.scheduling.assign import assign_workload
from rlhfless.scheduling.cost import Lifetime, cost_breakdown
from rlhfless.scheduling.handoff import handoff_estimate
from rlhfless.scheduling.learner import ArrivalCurve, learner_queue, learner_start
from rlhfless.scheduling.planning import GroupLengthPredictor, RatioTracker, prewarm_margin
from rlhfless.scheduling.prewarm import keep_or_prewarm
from rlhfless.scheduling.scaling import choose_actor_count
from rlhfless.scheduling.step import plan_step
from rlhfless.scheduling.units import whole_groups
from rlhfless.scheduling.workmodel import bin_times
from rlhfless.sim import policies
from rlhfless.sim.actors import ActorLife, run_barrier, run_global, run_no_cut, run_stream
from rlhfless.sim.config import SimConfig
from rlhfless.sim.gpus import earliest_start, peak_gpus
from rlhfless.sim.results import StepResult
from rlhfless.sim.rollout import make_groups
from rlhfless.sim.workload import Workload

STEP_MODES = ("stream", "barrier")


@dataclass
class Pending:
    """An actor instance for the next step: prewarmed (init running) or kept alive."""

    start: float  # billed from
    init_done: float  # ready for the new weights from


class ServerlessSim:
    """State across steps: length predictors, measured times, the clock (end of the previous
    weight publish), and the actor instances waiting for the next step."""

    def __init__(self, cfg: SimConfig, w: Workload, name: str = "rlhfless"):
        if cfg.step_mode not in STEP_MODES:
            raise ValueError(f"step_mode must be one of {STEP_MODES}, got {cfg.step_mode!r}")
        if cfg.pool not in ("quota", "shared"):
            raise ValueError(f"pool must be 'quota' or 'shared', got {cfg.pool!r}")
        self.cfg, self.w, self.name = cfg, w, name
        self.inputs = cfg.planner_inputs
        self.predictor = GroupLengthPredictor(alpha=cfg.sched.ewma_alpha)
        self.clock = 0.0
        self.measured: dict[str, float] = {}  # EWMA of phase durations (barrier step)
        # actual / planned rollout makespan: corrects the times planned from it (the learner's
        # start, next step's prewarm); the learner does not feed back into it
        self.rollout_ratio = RatioTracker()
        self.arrival_curve = ArrivalCurve()  # measured shape of the learner's arrivals
        self.learner_rate: float | None = None  # measured learner GPU-s per token (EWMA)
        self.pending: list[Pending] = []
        self.lives: list[Lifetime] = []  # every instance of every step (for peaks)

    @property
    def quota(self) -> int | None:
        return self.cfg.gpus if self.cfg.pool == "quota" else None

    def cold_starts(self) -> dict[str, float]:
        cfg, g = self.cfg, self.cfg.gpus
        return {
            "actor": cfg.over.actor_init_s,  # + weights, which must wait for the publish
            "reference": cfg.over.learner_init_s + cfg.reference_load_s(g),
            "trainer": cfg.over.learner_init_s + cfg.learner_load_s(g),
        }

    # ---- one step --------------------------------------------------------------------------
    def step(self, step: int, epoch: int, prompts: np.ndarray) -> StepResult:
        cfg, s, w = self.cfg, self.cfg.sched, self.w
        t0, g = self.clock, w.group_size
        ids = [w.prompt_ids[p] for p in prompts]
        pl, lens = w.prompt_len[prompts], w.lengths[epoch, prompts]
        init_s, load_s = cfg.over.actor_init_s, cfg.actor_load_s()
        lives: list[Lifetime] = []
        scale = self.rollout_ratio.correct(1.0)  # recent actual / planned rollout

        # 1. plan ----------------------------------------------------------------------------
        predicted = s.length_prediction and self.predictor.known_fraction(ids) >= 0.5
        square = None
        if s.length_prediction:
            pred_mean, pred_max = self.predictor.predict(ids)
            square = self.predictor.predict_square(ids)
        else:  # every group looks the same: the worst case, as the driver plans it
            pred_mean = pred_max = np.full(len(ids), float(w.max_len))
        streaming = cfg.step_mode == "stream"
        handoff = s.cut_migrate and s.tau < 1 and cfg.cut_mode == "stream"
        handoff_tau = s.tau if handoff else None
        linger = cfg.over.scale_down_s if streaming else s.keep_alive_s
        profile = policies.actor_profile(cfg, pl, pred_mean, init_s + load_s, self.inputs,
                                         linger)
        work = policies.work_units(pred_mean, pred_max, g, pl, self.inputs, square)
        max_n = min(s.max_actors, cfg.max_replicas, len(prompts))
        warm = min(len(self.pending), max_n) if s.prewarm else 0
        lplan = splan = next_start = None
        units = whole_groups(work)
        if streaming:  # actors and learner planned together (`plan_step`)
            splan = self._plan_step(work, profile, pl, pred_mean, max_n, warm, handoff_tau,
                                    step)
            bins, lplan, units = splan.bins, splan.learner, splan.units
        elif s.cost_aware:
            bins = choose_actor_count(work, 1, profile, s.lam, max_n, warm=warm,
                                      policy=s.assignment, seed=cfg.seed + step).bins
        else:
            bins = assign_workload(work, min(s.actors, max_n), profile, s.assignment,
                                   cfg.seed + step)
        bins = [b for b in bins if len(b)]
        if not streaming:  # warm instances take the longest bins (as the policy assumed)
            order = np.argsort(-bin_times(work, bins, profile), kind="stable")
            bins = [bins[i] for i in order]
        cold_at = t0 + (cfg.over.scale_down_s if self.quota else 0.0)  # after the learner
        # the first ready serve this step; the rest are released as it starts
        by_ready = sorted(self.pending, key=lambda p: p.init_done)
        pending = by_ready[:len(bins)] if warm else []
        spare = by_ready[len(pending):]
        starts = [p.start for p in pending] + [cold_at] * (len(bins) - len(pending))
        readies = ([max(p.init_done, t0) + load_s for p in pending]
                   + [cold_at + init_s + load_s] * (len(bins) - len(pending)))
        offsets = np.array(readies) - t0
        if splan is not None:
            planned_gen = splan.rollout_s
        else:
            planned_gen = handoff_estimate(work, bins, profile, 1.0, offsets).makespan
        groups = make_groups(w, epoch, prompts, pred_mean)
        # Instances prewarmed but not needed: released as the step starts.
        lives += [Lifetime(p.start, t0 + cfg.over.scale_down_s, cfg.tp,
                           min(init_s, t0 - p.start)) for p in spare]
        if lplan is not None:
            # next step's actors: init done as v+1 is published (planned end, corrected by
            # the recent ratio of actual to planned rollouts), plus the margin
            lead = init_s + prewarm_margin({"actor": init_s})
            next_start = t0 + lplan.end_s - lead  # planned on the corrected rollout

        # 2. rollout ------------------------------------------------------------------------
        mem, prefix = cfg.dedicated_mem_util, cfg.prefix_cache and s.dedup_prefill
        actors: list[ActorLife] = []
        for i, b in enumerate(bins):
            e = cfg.engine(i, readies[i], mem)
            e.prefix_cache = prefix
            a = ActorLife(e, starts[i], readies[i])
            # in the policy's order; a unit is a group or a part of its samples
            e.add([groups[units[k].group][j] for k in b for j in units[k].samples], a.ready)
            actors.append(a)
        out = self._rollout(actors, profile, streaming)
        gen_end = out.gen_end
        if next_start is not None:  # the driver sees the rollout end: prewarm by then
            next_start = min(next_start, gen_end)
        for a in out.actors:
            a.release += cfg.over.scale_down_s
        engines = [a.engine for a in out.actors]
        first_ready = min(a.ready for a in actors)
        done = np.array([max(r.finish_time for r in grp) for grp in groups])

        # 3. learn (planned times corrected by earlier steps' rollouts, then this one's) ---
        actor_lives = [Lifetime(a.start, a.release, cfg.tp, a.ready - a.start, tuple(a.busy))
                       for a in out.actors]
        prev = [x for x in self.lives if x.end is None or x.end > t0]  # still held at t0
        if streaming:
            assert lplan is not None
            learn = self._learn_stream(t0, lplan, done, pl, lens, prev + actor_lives + lives)
        else:
            learn = self._learn_barrier(t0, gen_end, planned_gen, pl, lens, pred_mean)
        t_end = learn["t_end"]
        if predicted:
            self.rollout_ratio.observe(planned_gen, gen_end - t0)
        lives += learn["lives"]

        # 4. next step's actors: kept alive or prewarmed so they are ready at t_end ----------
        actor_lives, prewarmed = self._prepare_next(
            actor_lives, len(bins), t_end, next_start if lplan else learn["next_start"],
            prev + lives)
        lives += actor_lives
        self.clock = t_end
        if s.length_prediction:
            self.predictor.observe(ids, lens)
        self.lives += lives

        # 5. record --------------------------------------------------------------------------
        cost = cost_breakdown(lives, min(x.start for x in lives), t_end + 1e9)
        phases = {"sync": first_ready - t0, "gen": gen_end - first_ready, **learn["phases"]}
        extra = {"tail_actors": float(out.targets),
                 "cut_s": (out.cut_at - t0) if out.cut_at is not None else float("nan"),
                 "planned_gen_s": planned_gen, "actual_gen_s": gen_end - t0,
                 "cold_gpu_s": cost.cold_gpu_seconds, "idle_ratio": cost.idle_ratio,
                 "busy_gpu_s": cost.busy_gpu_seconds, "idle_gpu_s": cost.idle_gpu_seconds,
                 "warm_actors": float(len(pending)), "rollout_scale": scale,
                 "split_groups": float(len({u.group for u in units if len(u.samples) < g})),
                 **learn["extra"]}
        return StepResult(
            self.name, step, epoch, t_end - t0, cost.gpu_seconds, phases,
            sum(e.stats.decode_tokens for e in engines),
            prefill_tokens=sum(e.stats.prefill_tokens for e in engines),
            prefill_saved=sum(e.stats.prefill_saved for e in engines),
            preemptions=sum(e.stats.preemptions for e in engines),
            actors=len(bins), migrated=out.migrated,
            # the next step's prewarmed actors hold their GPUs during this step's tail
            peak_gpus=peak_gpus(self.lives + prewarmed, t0, t_end),
            gen_busy_gpu_s=cfg.tp * sum(e.stats.busy_s for e in engines),
            t0=t0, extra=extra,
        )

    # ---- rollout ---------------------------------------------------------------------------
    def _rollout(self, actors: list[ActorLife], profile, driver_releases: bool):
        """Run the actors with the configured cut. With the streaming step the driver scales
        an actor down as soon as it has nothing left (it sees every group reported)."""
        cfg, s = self.cfg, self.cfg.sched
        linger = 0.0 if driver_releases else s.keep_alive_s

        def plan_tail(unfinished, n_from):
            return policies.migration_bins(unfinished, n_from, profile, s.lam, self.w.max_len,
                                           self.inputs)

        def spawn(at: float) -> ActorLife | None:
            if self.quota:  # no GPUs to spare: the tail goes to actors still alive
                return None
            e = cfg.engine(len(actors), at + cfg.over.actor_init_s + cfg.actor_load_s(),
                           cfg.dedicated_mem_util)
            return ActorLife(e, at, e.start)

        def cut_after(n: int) -> int:
            return policies.cut_after(n, s.tau)

        if not (s.cut_migrate and s.tau < 1 and len(actors) > 1):
            return run_no_cut(actors, linger)
        if cfg.cut_mode == "global":
            return run_global(actors, cut_after, plan_tail, linger)
        if cfg.cut_mode == "stream":
            return run_stream(actors, cut_after, linger)
        return run_barrier(actors, cut_after, plan_tail, spawn, linger)

    # ---- streaming learner -----------------------------------------------------------------
    def _learner_rate_estimate(self, pl: np.ndarray, pred_mean: np.ndarray) -> float:
        """GPU-seconds per token: measured on earlier steps, else the cost model's estimate
        on the predicted lengths."""
        if self.learner_rate is not None:
            return self.learner_rate
        cfg, g = self.cfg, self.w.group_size
        lens = np.outer(pred_mean, np.ones(g))
        gpu_s = cfg.learner_gpu_s(pl, lens, self.cfg.sched.dedup_prefill).sum()
        return float(gpu_s / (pl.sum() + lens.sum()))

    def _group_tokens(self, pl: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Tokens the learner processes per group (the prompt once with shared prefixes)."""
        g = lengths.shape[1]
        return pl * (1 if self.cfg.sched.dedup_prefill else g) + lengths.sum(axis=1)

    def _report_s(self) -> float:
        """A finished group: reported by its actor, scored by the reward function (its share
        of the batch's reward time), sent on to the learner."""
        o = self.cfg.over
        n = self.cfg.prompts_per_step
        return 3 * o.call_s + o.reward_s / max(1, n)

    def _plan_step(self, work, profile, pl, pred_mean, max_n, warm, handoff_tau, step):
        cfg, s = self.cfg, self.cfg.sched
        tokens = self._group_tokens(pl, np.outer(pred_mean, np.ones(self.w.group_size)))
        budget = self.quota or cfg.gpus
        lprof = policies.learner_profile(cfg, self._learner_rate_estimate(pl, pred_mean),
                                         budget)
        if lprof.min_gpus > budget:
            raise ValueError(f"the {cfg.shape.name} learner needs {lprof.min_gpus} GPUs; "
                             f"the quota is {budget}")
        margin = prewarm_margin({"actor": cfg.over.actor_init_s,
                                 "learner": lprof.cold_start_s(lprof.min_gpus)})
        fixed = None if s.cost_aware else [min(s.actors, max_n)]
        return plan_step(work, tokens, profile, lprof, lam=s.lam, max_actors=max_n,
                         warm=warm, warm_ready_s=cfg.actor_load_s(), quota=self.quota,
                         handoff_tau=handoff_tau, arrival_curve=self.arrival_curve,
                         report_s=self._report_s(), margin_s=margin, policy=s.assignment,
                         seed=cfg.seed + step, candidates=fixed,
                         rollout_scale=self.rollout_ratio.correct(1.0),
                         split_groups=cfg.split_groups, runaway_floor=cfg.runaway_floor,
                         time_slack=cfg.time_slack)

    def _learn_stream(self, t0, lplan, done, pl, lens, held) -> dict:
        cfg, s = self.cfg, self.cfg.sched
        arrivals = done + self._report_s()
        work = cfg.learner_gpu_s(pl, lens, s.dedup_prefill)
        gpus = lplan.gpus
        if s.prewarm:  # planned lead before the corrected end, or once enough work is in
            want = t0 + learner_start(lplan, lplan.end_s, arrivals - t0,
                                      self._group_tokens(pl, lens))
        else:  # started on demand by the first group
            want = float(arrivals.min())
        start = earliest_start(held, self.quota, gpus, want)
        cold = cfg.over.learner_init_s + cfg.learner_load_s(gpus)
        ready = start + cold
        groups_done, busy = learner_queue(arrivals, work, gpus, ready)
        finish = cfg.learner_finish_s(gpus)
        t_end = groups_done + finish
        life = Lifetime(start, t_end + cfg.over.scale_down_s, gpus, cold,
                        tuple(busy) + ((groups_done, t_end),))
        gen_end = float(done.max())
        overlap = sum(max(0.0, min(b, gen_end) - a) for a, b in busy)
        tokens = self._group_tokens(pl, lens).sum()
        rate = float(work.sum() / tokens)
        self.learner_rate = rate if self.learner_rate is None else 0.5 * (
            self.learner_rate + rate)
        self.arrival_curve.observe(arrivals - t0, self._group_tokens(pl, lens), gen_end - t0)
        return {
            "t_end": t_end, "lives": [life],
            "phases": {"learn_tail": groups_done - gen_end, "finish": finish},
            "next_start": None,  # planned with the learner
            "extra": {"learner_gpus": float(gpus), "learner_start_s": start - t0,
                      "learner_ready_s": ready - t0, "learner_wait_s": start - want,
                      "planned_end_s": lplan.end_s, "overlap_s": overlap,
                      "learner_busy_s": sum(b - a for a, b in busy),
                      "learner_gpu_s": gpus * (t_end + cfg.over.scale_down_s - start)},
        }

    # ---- barrier step (reference, then trainer) ----------------------------------------------
    def _estimate(self, rollout_s: float, pl: np.ndarray, lens: np.ndarray) -> dict[str, float]:
        """Phase times before any was measured: the scheduler's rollout estimate and the
        cost model's scoring and training times for the predicted lengths."""
        cfg, dedup = self.cfg, self.cfg.sched.dedup_prefill
        return {
            "rollout": rollout_s,
            "score": cfg.forward_s(pl, lens, dedup, cfg.gpus, 2 if cfg.critic else 1),
            "train": cfg.forward_s(pl, lens, dedup, cfg.gpus) + cfg.train_s(pl, lens, dedup,
                                                                          cfg.gpus),
        }

    def _start(self, desired: float, phase_start: float) -> float:
        """Barrier step: quota — once the previous phase's instances have terminated; shared
        — at once, but never later than when it is needed."""
        if self.quota:
            return phase_start + self.cfg.over.scale_down_s
        return min(desired, phase_start)

    def _learn_barrier(self, t0, gen_end, planned_gen, pl, lens, pred_mean) -> dict:
        cfg, s = self.cfg, self.cfg.sched
        cold = self.cold_starts()
        lives: list[Lifetime] = []
        plan = policies.prewarm(s.prewarm, self.measured or self._estimate(
            planned_gen, pl, np.outer(pred_mean, np.ones(self.w.group_size))), cold)
        models = 2 if cfg.critic else 1
        score_s = max(cfg.forward_s(pl, lens, s.dedup_prefill, cfg.gpus, models),
                      cfg.over.reward_s)
        sc_start = self._start(plan.at("reference", {"rollout": t0}, gen_end), gen_end)
        sc_begin = max(gen_end, sc_start + cold["reference"])
        sc_end = sc_begin + score_s
        lives.append(Lifetime(sc_start, sc_end + cfg.over.scale_down_s, cfg.gpus,
                              cold["reference"], ((sc_begin, sc_end),)))
        phase_starts = {"rollout": t0, "score": gen_end}
        tr_start = self._start(plan.at("trainer", phase_starts, sc_end), sc_end)
        tr_begin = max(sc_end, tr_start + cold["trainer"])
        train_s = cfg.forward_s(pl, lens, s.dedup_prefill, cfg.gpus) + cfg.train_s(
            pl, lens, s.dedup_prefill, cfg.gpus)
        t_end = tr_begin + train_s + cfg.publish_s()
        lives.append(Lifetime(tr_start, t_end + cfg.over.scale_down_s, cfg.gpus,
                              cold["trainer"], ((tr_begin, t_end),)))
        for k, v in {"rollout": gen_end - t0, "score": sc_end - gen_end,
                     "train": t_end - sc_end}.items():
            old = self.measured.get(k)
            self.measured[k] = v if old is None else 0.5 * old + 0.5 * v
        plan = policies.prewarm(s.prewarm, self.measured, cold)
        phase_starts.update(train=sc_end)
        return {
            "t_end": t_end, "lives": lives,
            "phases": {"score_wait": sc_begin - gen_end, "score": score_s,
                       "train_wait": tr_begin - sc_end, "train": train_s,
                       "publish": cfg.publish_s()},
            "next_start": plan.at("actor", phase_starts, None),
            "extra": {},
        }

    # ---- next step's actors -------------------------------------------------------------------
    def _prepare_next(self, actor_lives: list[Lifetime], n_next: int, t_end: float,
                      next_start: float | None, others: list[Lifetime]
                      ) -> tuple[list[Lifetime], list[Lifetime]]:
        """Keep actors alive or prewarm new ones for the next step, within the quota.

        `others`: every other instance held from this step's start on. Returns the actors'
        lifetimes, those kept alive running on to `t_end` with no scale-down in between
        (billed to this step), and what the prewarmed instances hold from their start
        (billed to the next step, whose actors they are)."""
        cfg, s = self.cfg, self.cfg.sched
        self.pending = []
        if not s.prewarm:
            return actor_lives, []
        init_s, down_s = cfg.over.actor_init_s, cfg.over.scale_down_s
        lead = init_s + prewarm_margin({"actor": init_s})
        # Per instance, the cheaper way to be ready at t_end: stay alive from its release
        # or scale to zero and be prewarmed `lead` before.
        releases = [x.end - down_s if x.end is not None else t_end for x in actor_lives]
        keep, _ = keep_or_prewarm(releases, n_next, t_end, lead)
        lives = list(actor_lives)
        latest = sorted(range(len(lives)), key=lambda i: -releases[i])  # as keep_or_prewarm
        for i in latest[:len(keep)]:
            kept, end = replace(lives[i], end=t_end), lives[i].end or t_end
            # Staying alive past its planned release holds GPUs that the learner (started on
            # that release) or another actor may have been given: kept only where it fits.
            if self.quota and end < t_end and peak_gpus(
                    others + lives[:i] + [kept] + lives[i + 1:], end, t_end) > self.quota:
                continue
            lives[i] = kept
            self.pending.append(Pending(t_end, t_end))
        want = next_start if next_start is not None else t_end
        held = others + lives
        prewarmed: list[Lifetime] = []
        for _ in range(n_next - len(self.pending)):
            at = earliest_start(held, self.quota, cfg.tp, min(want, t_end))
            if at >= t_end:
                break  # no room before the step ends: it starts cold with the next step
            self.pending.append(Pending(at, at + init_s))
            prewarmed.append(Lifetime(at, t_end + init_s, cfg.tp))  # holds its GPUs from `at`
            held.append(prewarmed[-1])
        return lives, prewarmed

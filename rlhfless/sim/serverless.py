"""RLHFless in the cluster model, step by step as the driver runs it.

    plan      predict lengths (EWMA of mean and longest) → choose N actors (cost-aware)
              → assign groups to bins
    rollout   N actor functions; each is cut once a fraction τ of its samples is done and
              its unfinished samples (prompt + partial response, re-prefilled) continue on
              actors still running ("stream", default; `cut_mode` also offers one global
              cut, and the driver's current barrier between two rounds — see sim.actors)
    score     reference (+ critic) functions on all GPUs, shared-prefix forward (dedup)
    train     trainer function: old log-probs + update on all GPUs, publishes weights v+1

Billing (`rlhfless.scheduling.cost`): every function instance from its start (cold start
included) until released.  An idle actor lingers `keep_alive_s` (or until the rollout ends and
the driver scales the stage to zero); scoring and trainer functions are released when their
phase ends unless the prewarm plan keeps them warm across the gap.  Prewarm
(`rlhfless.scheduling.prewarm_plan` on measured phase times) starts a stage early so its cold
start overlaps the previous phase; an actor still has to load the new weights version after
it is published (on-policy).

pool="shared": instances start on free GPUs of a larger serverless pool whenever asked.
pool="quota": the job never holds more GPUs than the baseline reserves, so a stage waits until
the previous phase has released the GPUs it needs (prewarm can then hide little).

All decisions are the real `rlhfless.scheduling` functions, called through `sim.policies`.
"""

from __future__ import annotations

import numpy as np

from rlhfless.scheduling.cost import Lifetime, cost_breakdown
from rlhfless.sim import policies
from rlhfless.sim.actors import ActorLife, run_barrier, run_global, run_no_cut, run_stream
from rlhfless.sim.config import SimConfig
from rlhfless.sim.results import StepResult
from rlhfless.sim.rollout import make_groups
from rlhfless.sim.workload import Workload


def peak_gpus(lives: list[Lifetime]) -> int:
    events = sorted([(x.start, x.gpus) for x in lives] + [(x.end, -x.gpus) for x in lives],
                    key=lambda e: (e[0], e[1]))
    level = peak = 0.0
    for _, d in events:
        level += d
        peak = max(peak, level)
    return int(round(peak))


class ServerlessSim:
    """State across steps: length predictors, measured phase times, the clock (end of the
    previous weight publish) and when the next step's actors were asked to start."""

    def __init__(self, cfg: SimConfig, w: Workload, name: str = "rlhfless"):
        self.cfg, self.w, self.name = cfg, w, name
        self.inputs = cfg.planner_inputs
        self.predictors = policies.Predictors(cfg.sched.ewma_alpha)
        self.clock = 0.0
        self.measured: dict[str, float] = {}  # EWMA of phase durations, for prewarm
        self.next_actor_start: float | None = None
        self.warm_actors: list[float] = []  # kept-warm actors: billed again from this time

    def _remember(self, durations: dict[str, float]) -> None:
        for k, v in durations.items():
            old = self.measured.get(k)
            self.measured[k] = v if old is None else 0.5 * old + 0.5 * v

    def _start(self, desired: float, phase_start: float) -> float:
        """When a stage asked for at `desired` really starts (quota: not before its phase's
        GPUs are released; shared: at once, but never later than when it is needed)."""
        if self.cfg.pool == "quota":
            return phase_start
        return min(desired, phase_start)

    def cold_starts(self) -> dict[str, float]:
        cfg, g = self.cfg, self.cfg.gpus
        return {
            "actor": cfg.over.actor_init_s,  # + weights, which must wait for the publish
            "reference": cfg.over.learner_init_s + cfg.reference_load_s(g),
            "trainer": cfg.over.learner_init_s + cfg.learner_load_s(g),
        }

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

    # ---- one step --------------------------------------------------------------------------
    def step(self, step: int, epoch: int, prompts: np.ndarray) -> StepResult:
        cfg, s, w = self.cfg, self.cfg.sched, self.w
        t0, g, ka = self.clock, w.group_size, s.keep_alive_s
        ids = [w.prompt_ids[p] for p in prompts]
        pl, lens = w.prompt_len[prompts], w.lengths[epoch, prompts]
        cold = self.cold_starts()
        init_s, load_s = cold["actor"], cfg.actor_load_s()
        lives: list[Lifetime] = []

        # 1. plan ----------------------------------------------------------------------------
        pred_mean, pred_max = self.predictors.predict(ids, s.length_prediction)
        profile = policies.actor_profile(cfg, pl, pred_mean, pred_max, init_s + load_s,
                                         self.inputs)
        work = policies.work_units(cfg, profile, pred_mean, pred_max, g, pl, self.inputs)
        max_n = min(s.max_actors, cfg.max_replicas, len(prompts))
        if s.cost_aware:
            n_act, bins = policies.choose_n(work, profile, s.lam, max_n, s.assignment,
                                            cfg.seed + step)
        else:
            n_act = min(s.actors, max_n)
            bins = policies.assign_bins(work, n_act, profile, s.assignment, cfg.seed + step)
        bins = [b for b in bins if len(b)]
        planned_gen = policies.predicted_makespan(work, bins, profile)
        groups = make_groups(w, epoch, prompts, pred_mean)

        # 2. rollout: actors start (prewarmed or now), load weights v (published at t0) and
        # run their bins; the long tail is cut and migrated as `cfg.cut_mode` says.
        n_warm = min(len(self.warm_actors), len(bins)) if s.prewarm else 0
        desired = self.next_actor_start if self.next_actor_start is not None else t0
        cold_start = self._start(desired, t0)
        mem, prefix = cfg.dedicated_mem_util, cfg.prefix_cache and s.dedup_prefill

        def new_actor(eid: int, start: float, ready: float) -> ActorLife:
            e = cfg.engine(eid, ready, mem)
            e.prefix_cache = prefix
            return ActorLife(e, start, ready)

        actors: list[ActorLife] = []
        for i, b in enumerate(bins):
            if i < n_warm:  # kept warm since the last rollout: only the new weights to load
                a = new_actor(i, self.warm_actors[i], t0 + load_s)
            else:
                a = new_actor(i, cold_start, max(cold_start + init_s, t0) + load_s)
            a.engine.add([r for k in b for r in groups[k]], a.ready)  # in the policy's order
            actors.append(a)

        def plan_tail(unfinished, n_from):
            return policies.migration_bins(unfinished, n_from, profile, s.lam, w.max_len, cfg,
                                           self.inputs)

        def spawn(at: float) -> ActorLife:
            return new_actor(len(actors), at, at + init_s + load_s)

        def cut_after(n: int) -> int:
            return policies.cut_after(n, s.tau)

        if not (s.cut_migrate and s.tau < 1 and len(actors) > 1):
            out = run_no_cut(actors, ka)
        elif cfg.cut_mode == "global":
            out = run_global(actors, cut_after, plan_tail, ka)
        elif cfg.cut_mode == "stream":
            out = run_stream(actors, cut_after, plan_tail, ka)
        else:
            out = run_barrier(actors, cut_after, plan_tail, spawn, ka)
        gen_end = out.gen_end
        lives += [Lifetime(a.start, a.release, cfg.tp, a.ready - a.start, tuple(a.busy))
                  for a in out.actors]
        engines = [a.engine for a in out.actors]
        first_ready = min(a.ready for a in actors)

        # prewarm plan for the stages after the rollout (and the next rollout's actors)
        plan = policies.prewarm(s.prewarm, self.measured or self._estimate(
            planned_gen + load_s, pl, np.outer(pred_mean, np.ones(g))), cold)

        # 3. score: reference (+critic) on all GPUs
        models = 2 if cfg.critic else 1
        score_s = max(cfg.forward_s(pl, lens, s.dedup_prefill, cfg.gpus, models),
                      cfg.over.reward_s)
        sc_start = self._start(plan.at("reference", {"rollout": t0}, gen_end), gen_end)
        sc_begin = max(gen_end, sc_start + cold["reference"])
        sc_end = sc_begin + score_s
        lives.append(Lifetime(sc_start, sc_end, cfg.gpus, cold["reference"],
                              ((sc_begin, sc_end),)))

        # 4. train: old log-probs + update on all GPUs, then publish v+1
        phase_starts = {"rollout": t0, "score": gen_end}
        tr_start = self._start(plan.at("trainer", phase_starts, sc_end), sc_end)
        tr_begin = max(sc_end, tr_start + cold["trainer"])
        train_s = cfg.forward_s(pl, lens, s.dedup_prefill, cfg.gpus) + cfg.train_s(
            pl, lens, s.dedup_prefill, cfg.gpus)
        t_end = tr_begin + train_s + cfg.publish_s()
        lives.append(Lifetime(tr_start, t_end, cfg.gpus, cold["trainer"],
                              ((tr_begin, t_end),)))

        # next step's actors: prewarmed during this training (planned on the phase times
        # just measured), or kept warm across the gap
        self._remember({"rollout": gen_end - t0, "score": sc_end - gen_end,
                        "train": t_end - sc_end})
        plan = policies.prewarm(s.prewarm, self.measured, cold)
        phase_starts.update(train=sc_end)
        self.next_actor_start = plan.at("actor", phase_starts, None) if s.prewarm else None
        self.warm_actors = []
        if s.prewarm and plan.keeps_warm("actor") and cfg.pool == "shared":
            # Per instance, the cheaper of two ways to have it ready for the next rollout:
            # stay alive from its own release (billed continuously: no unbilled hole
            # between release and the end of the rollout), or scale to zero and be
            # prewarmed `lead` seconds before the next step (cold start + margin).  An
            # actor released early in the rollout (short bin, or cut) is cheaper to
            # prewarm.  Kept-warm time is billed to this step, never overlapping the
            # lifetime billed above.
            lead = cold["actor"] + policies.prewarm_margin(cold)
            keep, prewarm_at = policies.keep_or_prewarm(
                [a.release for a in out.actors], len(bins), t_end, lead)
            self.warm_actors = [t_end for _ in keep]
            lives += [Lifetime(r, t_end, cfg.tp) for r in keep]
            if prewarm_at is not None:
                self.next_actor_start = prewarm_at
        self.clock = t_end
        self.predictors.observe(ids, lens, s.length_prediction)

        # 5. record ----------------------------------------------------------------------------
        cost = cost_breakdown(lives, min(x.start for x in lives), t_end)
        phases = {
            "sync": first_ready - t0,
            "gen": gen_end - first_ready,
            "score_wait": sc_begin - gen_end,
            "score": score_s,
            "train_wait": tr_begin - sc_end,
            "train": train_s,
            "publish": cfg.publish_s(),
        }
        return StepResult(
            self.name, step, epoch, t_end - t0, cost.gpu_seconds, phases,
            sum(e.stats.decode_tokens for e in engines),
            prefill_tokens=sum(e.stats.prefill_tokens for e in engines),
            prefill_saved=sum(e.stats.prefill_saved for e in engines),
            preemptions=sum(e.stats.preemptions for e in engines),
            actors=len(bins), migrated=out.migrated, peak_gpus=peak_gpus(lives),
            gen_busy_gpu_s=cfg.tp * sum(e.stats.busy_s for e in engines),
            extra={"tail_actors": float(out.targets),
                   "cut_s": (out.cut_at - t0) if out.cut_at is not None else float("nan"),
                   "planned_gen_s": planned_gen, "cold_gpu_s": cost.cold_gpu_seconds,
                   "idle_ratio": cost.idle_ratio},
        )

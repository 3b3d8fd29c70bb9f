"""Quota mode: RLHFless never holds more GPUs at once than the baseline's cluster."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rlhfless.scheduling.cost import Lifetime
from rlhfless.sim.experiments import job
from rlhfless.sim.gpus import peak_gpus
from rlhfless.sim.runner import job_workload
from rlhfless.sim.serverless import ServerlessSim


@pytest.mark.parametrize("cluster,model,family,prompts,epochs", [
    ("16xL40S", "3b", "gpqa", 128, 4),  # the paper testbed's 16 L40S
    ("160xH100", "7b", "dapo", 256, 4),
])
def test_quota_never_exceeded_with_kept_and_prewarmed_actors(cluster, model, family, prompts,
                                                             epochs):
    cfg = replace(job(cluster, model, "grpo"), prompts_per_step=prompts)
    assert cfg.pool == "quota"
    w = job_workload(cfg, family, epochs=epochs)
    sim = ServerlessSim(cfg, w)
    results = [sim.step(i, e, p) for i, (e, p) in enumerate(w.steps(prompts, seed=cfg.seed))]
    # every instance of every step, the next step's prewarmed actors included
    assert peak_gpus(sim.lives) <= cfg.gpus
    assert max(r.peak_gpus for r in results) <= cfg.gpus
    # what used to overrun the quota ran: actors ready before their step began (kept alive
    # or prewarmed during the previous step's tail)
    assert any(r.extra["warm_actors"] > 0 for r in results)


def test_actor_kept_alive_only_where_the_quota_has_room():
    cfg = job("16xL40S", "3b", "grpo")
    sim = ServerlessSim(cfg, job_workload(cfg, "gpqa", epochs=1))
    down = cfg.over.scale_down_s
    # a 15-GPU learner started as the first actor released its GPU (release + scale-down)
    learner = Lifetime(95.0 + down, 101.0, 15)
    actors = [Lifetime(0.0, 94.0 + down, 1), Lifetime(0.0, 95.0 + down, 1)]
    lives, prewarmed = sim._prepare_next(actors, 2, 100.0, None, [learner])
    # both would be kept alive by cost alone; only the later one fits beside the learner
    assert [x.end for x in lives] == [94.0 + down, 100.0]
    assert len(sim.pending) == 1 and not prewarmed  # no room to prewarm the other either
    assert peak_gpus([learner, *lives]) <= cfg.gpus

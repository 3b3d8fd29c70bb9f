"""Entry point of one function instance: build the stage's handler, preload, serve HTTP.

    python -m rlhfless.functions.serve --stage actor --port 8080 --store /weights --job job.yaml

The job comes from `--job` (YAML or JSON file) or the RLHFJOB_SPEC environment variable (the
custom resource's JSON, as the operator passes it to Knative); the bearer token every caller
must present from RLHFLESS_TOKEN (the job's Secret; the local runtime sets a per-run one).
A function without a token refuses to start. Loading the latest weights
before reporting ready makes the measured cold start include the model load, as it would on
a real serverless platform.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import uvicorn

from rlhfless.api.spec import RLHFJob, SpecError, load_job, parse_job
from rlhfless.api.stages import STAGE_NAMES
from rlhfless.api.wire import JOB_ENV
from rlhfless.functions.app import PROCESS_STARTED_AT, FunctionError, StageHandler, create_app
from rlhfless.functions.auth import TokenMissing, token_from_env
from rlhfless.orphans import exit_with_parent
from rlhfless.store import WeightStore, WeightStoreError


def load_job_for_function(job_file: str | None) -> RLHFJob:
    if job_file:
        return load_job(job_file)  # read as every job file is (1e-05 is a number)
    if os.environ.get(JOB_ENV):
        return parse_job(json.loads(os.environ[JOB_ENV]), JOB_ENV)
    raise SpecError([f"no job: pass --job or set {JOB_ENV}"], "function")


def build_handler(stage: str, job: RLHFJob, store: WeightStore) -> StageHandler:
    spec = job.spec
    if stage == "actor":
        from rlhfless.functions.actor import ActorHandler

        return ActorHandler.from_store(store, spec.generation.engine,
                                       spec.scheduling.dedup_prefill, spec.stages[stage].gpus)
    if stage == "reward":
        from rlhfless.functions.reward import RewardHandler

        return RewardHandler(spec.reward)
    if stage == "scorer":
        from rlhfless.functions.scorer import ScorerHandler

        return ScorerHandler(spec)
    if stage == "learner":
        ranks = spec.stages[stage].ranks
        if ranks > 1:  # this process is rank 0 of `ranks`
            from rlhfless.functions.learner_ranks import RankedLearnerHandler

            return RankedLearnerHandler(store, job, ranks)
        from rlhfless.functions.learner import LearnerHandler

        return LearnerHandler(store, spec)
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_NAMES)}")


def preload(handler: StageHandler, store: WeightStore) -> None:
    """Warm the handler on the newest version so the first request is not a cold one (the
    learner also loads the frozen reference, version 0, when the job has a KL term).

    Best effort: the newest version may be one a driver will not use (left by a step that
    never reached its checkpoint, or corrupt); the version a request names is loaded then.
    """
    latest = store.latest()
    warm = getattr(handler, "warm", None)
    if latest is not None and warm is not None:
        try:
            warm(latest)
        except (FunctionError, WeightStoreError) as exc:
            print(f"not preloaded: {getattr(exc, 'message', exc)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve one RLHFless stage function.")
    parser.add_argument("--stage", required=True, choices=STAGE_NAMES)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--store", required=True, help="weights store directory")
    parser.add_argument("--job", default=None, help="job file (YAML/JSON)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="exit when the launching process dies (embedded runtime)")
    args = parser.parse_args(argv)
    started = time.time()
    if args.exit_with_parent:
        exit_with_parent()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        token = token_from_env()
    except TokenMissing as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(2) from None
    try:
        job = load_job_for_function(args.job)
    except SpecError as exc:
        print(f"invalid job: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    store = WeightStore(args.store)
    if not job.spec.stages.has(args.stage):
        print(f"this job has no {args.stage} stage (its stages: "
              f"{', '.join(job.spec.stages.deployed)})", file=sys.stderr)
        raise SystemExit(2)
    handler = build_handler(args.stage, job, store)
    preload(handler, store)

    def report_exit() -> None:
        close = getattr(handler, "close", None)
        if close is not None:
            close()  # a multi-rank learner's followers leave (and free their GPUs) first
        # This process's own account of its life (tests compare it with the runtime's meter).
        print("rlhfless-instance-exit " + json.dumps(
            {"stage": args.stage, "started_at": PROCESS_STARTED_AT, "ended_at": time.time()}),
            flush=True)

    app = create_app(handler, token=token, cold_start_s=time.time() - started,
                     on_shutdown=report_exit)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()

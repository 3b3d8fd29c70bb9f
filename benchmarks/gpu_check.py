"""GPU checks that can really run, and their record in benchmarks/results/gpu/<device>.json.

    python benchmarks/gpu_check.py [--mode offline|networked] [--junit FILE] [--out DIR]
    python benchmarks/gpu_check.py --cpu [--out DIR]     # the same checks, toy sizes, on CPU

scripts/gpu_check_offline.sh and scripts/gpu_check.sh run it on a GPU machine; a test runs
`--cpu` so that this file cannot rot between GPU runs. Checks (each: ok, seconds, peak GPU
memory, its numbers):
  exactness        tiny GPT-2, fp32 with TF32 off: shared-prefix log-probs and gradients vs
                   the naive per-sample forward (|dlogp| <= 1e-5, gradients 1e-4 relative)
  checkpointing    the same under gradient checkpointing on this transformers: the pass falls
                   back to full sequences and equals the naive scores; a trainer update with
                   checkpointing equals the one without (loss within 1e-6)
  engine_bf16      the transformers actor engine on a random-initialised model of a real shape
                   (Qwen2.5-1.5B; no download) in bf16: every sample once, a log-prob per token,
                   tokens/s
  scoring_bf16     shared-prefix vs naive scoring of the same model in bf16: |dlogp| mean <= 0.01
                   and max <= 0.1 (bf16 logits carry ~3 significant digits), and the speed-up
  learner_*        one GRPO update of that model in fp32 (the weight store's dtype) on one GPU:
                   the default trainer, the same with gradient checkpointing, and the sharding
                   backend (DeepSpeed ZeRO-2, one rank); peak memory against the memory plan's
                   estimate (rlhfless.model.memory): the plan must not be below what was used
With --junit (scripts/gpu_check.sh) the pytest results are recorded too, and any skipped test
makes the run fail: a GPU run that skipped its GPU tests has tested nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Qwen2.5-1.5B's published architecture (config.json), random weights: real shapes, no hub.
QWEN25_15B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536,
              "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
              "num_key_value_heads": 2, "max_position_embeddings": 32768,
              "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0}
# The same architecture at toy size (--cpu).
QWEN_TOY = {**QWEN25_15B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512}
TOL = {"exact_logprob_abs": 1e-5, "exact_grad_rel": 1e-4, "checkpointing_loss_abs": 1e-6,
       "bf16_logprob_mean": 0.01, "bf16_logprob_max": 0.1}
# DeepSpeed on one rank (a learner with one GPU may use it); several ranks shard with FSDP2
# (the `learner_fsdp` check).
SHARDING = {"backend": "deepspeed", "zero_stage": 2}


@dataclass
class Sizes:
    config: dict[str, Any]
    prompts: int  # engine and learner batch: prompts x group samples
    group: int
    prompt_tokens: int
    new_tokens: int  # engine
    train_tokens: int  # response length in the learner batch


GPU_SIZES = Sizes(QWEN25_15B, prompts=2, group=8, prompt_tokens=128, new_tokens=64,
                  train_tokens=128)
CPU_SIZES = Sizes(QWEN_TOY, prompts=2, group=4, prompt_tokens=16, new_tokens=8,
                  train_tokens=8)


@dataclass
class Report:
    mode: str
    device: str
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)


# ---- helpers --------------------------------------------------------------------------------
def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    import torch

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda}
    for name in ("transformers", "deepspeed", "vllm", "accelerate", "pydantic"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    with contextlib.suppress(OSError, ValueError):
        head = (REPO / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref:"):
            head = (REPO / ".git" / head.split()[1]).read_text().strip()
        out["rlhfless_commit"] = head[:12]
    return out


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _peak_reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device == "cuda" else None


def run_check(report: Report, name: str, fn: Callable[[], dict[str, Any]]) -> None:
    import gc

    _peak_reset(report.device)
    started = time.perf_counter()
    try:
        result = fn()
        ok = bool(result.pop("ok", True))
    except Exception as exc:  # one failing check must not hide the others
        result, ok = {"error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc(limit=6)}, False
    record = {"name": name, "ok": ok, "seconds": round(time.perf_counter() - started, 3),
              "peak_memory_bytes": _peak(report.device), **result}
    report.checks.append(record)
    gc.collect()
    print(f"[{'ok' if ok else 'FAIL'}] {name} ({record['seconds']:.1f}s)"
          + (f": {result.get('error')}" if not ok else ""), flush=True)


def tiny_model(device: str):
    from rlhfless.model.loading import load_tiny

    tiny = SimpleNamespace(vocab_size=128, n_layer=2, n_embd=64, n_head=4, n_positions=256,
                           seed=0)
    return load_tiny(tiny)[0].to(device)


def random_model(config: dict[str, Any], device: str, dtype):
    """A causal LM of `config`'s shape with random weights, built on the device."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    kwargs = dict(config)
    cfg = CONFIG_MAPPING[kwargs.pop("model_type")](**kwargs)
    with torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def batch(sizes: Sizes, vocab: int, response_tokens: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    top = min(vocab, 128)  # ids the project's character tokenizer can also produce
    prompts = [torch.randint(2, top, (sizes.prompt_tokens,), generator=gen).tolist()
               for _ in range(sizes.prompts)]
    groups = [[torch.randint(2, top, (int(n),), generator=gen).tolist()
               for n in torch.randint(response_tokens // 2, response_tokens + 1, (sizes.group,),
                                      generator=gen)]
              for _ in prompts]
    return prompts, groups


def _flat(prompts, groups):
    return ([p for p, g in zip(prompts, groups, strict=True) for _ in g],
            [r for g in groups for r in g])


# ---- the checks -----------------------------------------------------------------------------
def check_exactness(device: str) -> dict[str, Any]:

    from rlhfless.model.logprobs import grouped_logprobs, sequence_logprobs

    model = tiny_model(device).train()  # no dropout: train mode only enables autograd paths
    prompts, groups = batch(Sizes({}, 3, 4, 12, 0, 0), 128, 10, seed=1)
    naive = sequence_logprobs(model, *_flat(prompts, groups))
    loss = sum(x.sum() for x in naive)
    loss.backward()
    naive_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    shared = grouped_logprobs(model, prompts, groups)
    sum(x.sum() for g in shared for x in g).backward()
    d_logp = max(float((a - b).detach().abs().max()) for a, b in
                 zip([x for g in shared for x in g], naive, strict=True))
    d_grad = max(float((p.grad - naive_grads[n]).abs().max())
                 / (float(naive_grads[n].abs().max()) + 1e-12)
                 for n, p in model.named_parameters())
    return {"ok": d_logp <= TOL["exact_logprob_abs"] and d_grad <= TOL["exact_grad_rel"]
            and shared.prefill_tokens_saved > 0,
            "max_abs_dlogprob": d_logp, "max_rel_dgrad": d_grad,
            "prefill_tokens_saved": shared.prefill_tokens_saved}


def check_checkpointing(device: str) -> dict[str, Any]:
    import copy

    import torch

    from rlhfless.api.spec import AlgorithmSpec, TrainerSpec
    from rlhfless.model.checkpointing import checkpointing_active, enable_checkpointing
    from rlhfless.model.logprobs import grouped_logprobs, sequence_logprobs
    from rlhfless.train import PolicyTrainer, make_train_batch

    base = tiny_model(device)
    prompts, groups = batch(Sizes({}, 2, 3, 6, 0, 0), 128, 6, seed=2)
    with torch.no_grad():
        naive = sequence_logprobs(base, *_flat(prompts, groups))
    model = copy.deepcopy(base)
    enable_checkpointing(model)
    scores = grouped_logprobs(model, prompts, groups)
    d_logp = max(float((a - b).detach().abs().max()) for a, b in
                 zip([x for g in scores for x in g], naive, strict=True))
    algo = AlgorithmSpec(name="grpo", lr=1e-3, mini_batch_size=16, kl_beta=0.0)
    rewards = [[float(i == 0) for i in range(len(g))] for g in groups]
    train_batch = make_train_batch(algo, prompts, groups, rewards)
    plain = PolicyTrainer(copy.deepcopy(base), algo).step(train_batch)
    ckpt = PolicyTrainer(copy.deepcopy(base), algo,
                         TrainerSpec(grad_checkpointing=True)).step(train_batch)
    d_loss = abs(plain["loss"] - ckpt["loss"])
    return {"ok": checkpointing_active(model) and scores.prefill_tokens_saved == 0
            and d_logp <= TOL["exact_logprob_abs"] and d_loss <= TOL["checkpointing_loss_abs"],
            "detected": checkpointing_active(model), "max_abs_dlogprob": d_logp,
            "loss_plain": plain["loss"], "loss_checkpointed": ckpt["loss"]}


def check_engine(device: str, sizes: Sizes, work: Path) -> dict[str, Any]:
    import torch

    from rlhfless.api.wire import ActorRequest, RolloutPrompt
    from rlhfless.functions.engines.collect import collect
    from rlhfless.functions.engines.hf import TransformersEngine
    from rlhfless.model.materialize import materialize_base
    from rlhfless.model.tokenizer import CharTokenizer
    from rlhfless.store import WeightStore

    dtype = torch.bfloat16
    model = random_model(sizes.config, "cpu", dtype)  # the store writes from host memory
    store = WeightStore(work / "engine-store")
    spec = SimpleNamespace(source="hf", path="random-" + sizes.config["model_type"],
                           gguf_file=None, tiny=None)
    started = time.perf_counter()
    materialize_base(spec, store, loaded=(model, CharTokenizer()))
    del model
    store_s = time.perf_counter() - started
    engine = TransformersEngine(store)
    started = time.perf_counter()
    engine.warm(0)
    load_s = time.perf_counter() - started
    loaded, _ = engine.models.get(0)
    on = next(loaded.parameters())
    prompts, _ = batch(sizes, sizes.config["vocab_size"], 1)
    request = ActorRequest(request_id="gpu-check", weights_version=0,
                           max_new_tokens=sizes.new_tokens, temperature=1.0, seed=1,
                           prompts=[RolloutPrompt(key=f"p{i}", prompt_ids=p,
                                                  sample_indices=list(range(sizes.group)))
                                    for i, p in enumerate(prompts)])
    collect(engine, request.model_copy(update={"request_id": "warm-up"}))
    _sync(device)
    started = time.perf_counter()
    response = collect(engine, request)
    _sync(device)
    seconds = time.perf_counter() - started
    samples = response.samples
    contract = (sorted((s.key, s.index) for s in samples)
                == sorted((f"p{i}", j) for i in range(len(prompts)) for j in range(sizes.group))
                and all(len(s.logprobs) == len(s.response) > 0 for s in samples)
                and all(float(lp) <= 1e-3 for s in samples for lp in s.logprobs))
    tokens = sum(len(s.response) for s in samples)
    return {"ok": contract and on.device.type == device and on.dtype == dtype,
            "model_params": sum(p.numel() for p in loaded.parameters()),
            "dtype": str(on.dtype), "device": str(on.device), "samples": len(samples),
            "tokens": tokens, "generate_s": seconds, "tokens_per_s": tokens / seconds,
            "store_write_s": store_s, "load_s": load_s}


def check_scoring(device: str, sizes: Sizes) -> dict[str, Any]:
    import torch

    from rlhfless.model.logprobs import grouped_logprobs, sequence_logprobs

    model = random_model(sizes.config, device, torch.bfloat16)
    prompts, groups = batch(sizes, sizes.config["vocab_size"], sizes.train_tokens, seed=3)
    with torch.no_grad():
        grouped_logprobs(model, prompts[:1], groups[:1])  # warm-up (kernels, allocator)
        _sync(device)
        started = time.perf_counter()
        shared = grouped_logprobs(model, prompts, groups)
        _sync(device)
        shared_s = time.perf_counter() - started
        started = time.perf_counter()
        naive = sequence_logprobs(model, *_flat(prompts, groups))
        _sync(device)
        naive_s = time.perf_counter() - started
    gaps = torch.cat([(a.float() - b.float()).abs() for a, b in
                      zip([x for g in shared for x in g], naive, strict=True)])
    mean, worst = float(gaps.mean()), float(gaps.max())
    print(f"shared-prefix scoring: {naive_s / shared_s:.2f}x faster than naive "
          f"(bf16 |dlogp| mean {mean:.2e}, max {worst:.2e})", flush=True)
    return {"ok": mean <= TOL["bf16_logprob_mean"] and worst <= TOL["bf16_logprob_max"],
            "mean_abs_dlogprob": mean, "max_abs_dlogprob": worst, "shared_s": shared_s,
            "naive_s": naive_s, "speedup": naive_s / shared_s,
            "prefill_tokens_saved": shared.prefill_tokens_saved}


def check_learner(device: str, sizes: Sizes, backend: str, zero_stage: int,
                  checkpointing: bool, fsdp: bool = False) -> dict[str, Any]:
    """One GRPO update. `fsdp`: the multi-rank learner's path (FSDP2, bf16 compute on a GPU)
    as one rank of a process group."""
    import torch

    from rlhfless.api.spec import AlgorithmSpec, TrainerSpec
    from rlhfless.model.memory import Workload, estimate
    from rlhfless.model.shape import hf_config_shape
    from rlhfless.train import PolicyTrainer, make_train_batch

    model = random_model(sizes.config, device, torch.float32).train()
    prompts, groups = batch(sizes, sizes.config["vocab_size"], sizes.train_tokens, seed=4)
    responses = sizes.prompts * sizes.group
    algo = AlgorithmSpec(name="grpo", lr=1e-6, mini_batch_size=responses, kl_beta=0.0)
    rewards = [[float(i % 2) for i in range(len(g))] for g in groups]
    train_batch = make_train_batch(algo, prompts, groups, rewards)
    spec = TrainerSpec(backend=backend, zero_stage=zero_stage, grad_checkpointing=checkpointing)
    ranks = None
    if fsdp:
        from rlhfless.train.distributed import init_ranks
        from rlhfless.train.ranks import LOOPBACK, free_port

        ranks = init_ranks(0, 1, LOOPBACK, free_port(), device_type=device)
    try:
        trainer = PolicyTrainer(model, algo, spec, ranks=ranks)
        _sync(device)
        started = time.perf_counter()
        stats = trainer.step(train_batch)
        _sync(device)
        seconds = time.perf_counter() - started
    finally:
        if ranks is not None:
            from rlhfless.train.distributed import close_ranks

            close_ranks()
    shape = hf_config_shape(sizes.config)
    work = Workload("train", trained=("policy",), sequences=responses, group_size=sizes.group,
                    response_tokens=sizes.train_tokens,
                    backend="fsdp" if fsdp else backend, zero_stage=zero_stage,
                    checkpointing=checkpointing)
    planned = estimate("learner", "gpu", shape, work, 4).total
    peak = _peak(device)
    covered = peak is None or peak <= planned
    out = {"ok": covered and all(map(_finite, (stats["loss"], stats["grad_norm"]))),
           "backend": "fsdp2" if fsdp else backend, "zero_stage": zero_stage,
           "checkpointing": checkpointing,
           "params": shape.params, "responses": responses, "step_s": seconds,
           "loss": stats["loss"], "grad_norm": stats["grad_norm"], "estimate_bytes": planned}
    if peak is not None:
        out["peak_over_estimate"] = peak / planned
    del trainer, model
    return out


def _finite(x: float) -> bool:
    import math

    return math.isfinite(x)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ---- pytest results (networked script) --------------------------------------------------------
def pytest_results(junit: Path) -> dict[str, Any]:
    """Counts and per-test durations from a JUnit XML file; skipped tests are listed."""
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    tests, skipped, failed = [], [], []
    for case in (c for s in suites for c in s.iter("testcase")):
        name = f"{case.get('classname')}::{case.get('name')}"
        tests.append({"test": name, "seconds": float(case.get("time") or 0)})
        if case.find("skipped") is not None:
            skipped.append(f"{name}: {case.find('skipped').get('message', '')}")
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
    return {"tests": len(tests), "failed": failed, "skipped": skipped, "durations": tests}


def verdict(checks_ok: bool, tests: dict[str, Any] | None) -> bool:
    """The run passes when every check passed and, if tests ran, none failed or skipped."""
    if tests is None:
        return checks_ok
    return checks_ok and tests["tests"] > 0 and not tests["failed"] and not tests["skipped"]


# ---- main -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="offline", choices=("offline", "networked"))
    parser.add_argument("--cpu", action="store_true", help="toy sizes on the CPU (tests)")
    parser.add_argument("--junit", type=Path, help="pytest JUnit XML to record (any skip fails)")
    parser.add_argument("--out", type=Path, help="directory of the JSON (default: "
                        "benchmarks/results/gpu, runs/gpu-check-cpu with --cpu)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temp dir)")
    args = parser.parse_args(argv)

    import tempfile

    import torch

    if args.cpu:
        device, name, sizes = "cpu", "cpu", CPU_SIZES
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device visible; --cpu runs the checks on the CPU at toy "
                  "sizes", file=sys.stderr)
            return 2
        device, name, sizes = "cuda", torch.cuda.get_device_name(0), GPU_SIZES
        # fp32 means fp32 here: no TF32 matmuls (Ampere/Hopper default them for convolutions,
        # and Triton kernels for matmuls, see TRITON_F32_DEFAULT in the scripts).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    report = Report(mode="cpu" if args.cpu else args.mode, device=name)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = args.work or Path(tmp)
        run_check(report, "exactness", lambda: check_exactness(device))
        run_check(report, "checkpointing", lambda: check_checkpointing(device))
        run_check(report, "engine_bf16", lambda: check_engine(device, sizes, work))
        run_check(report, "scoring_bf16", lambda: check_scoring(device, sizes))
        run_check(report, "learner_default",
                  lambda: check_learner(device, sizes, "torch", 0, False))
        run_check(report, "learner_checkpointing",
                  lambda: check_learner(device, sizes, "torch", 0, True))
        # The multi-rank learner's path: FSDP2 (one rank here), bf16 compute on a GPU.
        run_check(report, "learner_fsdp",
                  lambda: check_learner(device, sizes, "torch", 0, True, fsdp=True))
        if _has("deepspeed"):
            run_check(report, "learner_sharded",
                      lambda: check_learner(device, sizes, SHARDING["backend"],
                                            SHARDING["zero_stage"], False))
        else:
            report.checks.append({"name": "learner_sharded", "ok": False,
                                  "error": "deepspeed is not installed"})
    result: dict[str, Any] = {
        "device": name, "mode": report.mode, "versions": versions(),
        "environment": {k: os.environ.get(k) for k in (
            "TRITON_F32_DEFAULT", "VLLM_WORKER_MULTIPROC_METHOD", "CUDA_VISIBLE_DEVICES")},
        "tolerances": TOL, "sizes": {**sizes.__dict__, "config": sizes.config},
        "checks": report.checks, "elapsed_s": round(time.perf_counter() - started, 1),
    }
    tests = pytest_results(args.junit) if args.junit is not None else None
    if tests is not None:
        result["pytest"] = tests
        for line in tests["skipped"]:
            print(f"[FAIL] skipped: {line}", flush=True)
        for line in tests["failed"]:
            print(f"[FAIL] failed: {line}", flush=True)
    ok = verdict(report.ok, tests)
    result["ok"] = ok
    out = args.out or REPO / ("runs/gpu-check-cpu" if args.cpu else "benchmarks/results/gpu")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{device_slug(name)}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"gpu_check: {'all checks passed' if ok else 'FAILED'}; wrote {path}", flush=True)
    return 0 if ok else 1


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())

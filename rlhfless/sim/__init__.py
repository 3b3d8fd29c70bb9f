"""Cluster simulator: RLHFless vs a serverful verl-like baseline (and an RLHFuse-like one).

Modules, bottom up:

* `hardware` — documented GPU/model constants, efficiency factors, cold-start variants.
* `costmodel` — roofline decode (closed-form over an engine segment), prefill, forward and
  training FLOPs, KV capacity, measured-profile loading.
* `engine` — one continuous-batching engine (vLLM-like admission, preemption, prefix cache),
  event by event with a plain heap.
* `workload` — synthetic length families (DAPO-, GSM8K-, GPQA-, LiveCodeBench-like, ...) and
  jsonl traces.
* `rollout`, `actors` — running engines; the hand-off cut and the other cut modes.
* `verl` — the verl and RLHFuse-like baselines; `serverless` — RLHFless step by step (the
  streaming step with a fused learner, or the barrier step); `gpus` — quota and peaks.
* `bound` — a lower bound on the step for the same work and peak GPUs.
* `policies` — the adapter to the real `rlhfless.scheduling` functions.
* `runner`, `experiments`, `plots`, `cli.simulate_command` — experiments and outputs.
"""

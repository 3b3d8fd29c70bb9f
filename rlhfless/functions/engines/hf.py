"""Rollout with transformers on CPU (or one GPU): the embedded default engine.

One `GenerationSession` per request: whole groups prefill their prompt once; samples merged
in by a hand-off are prefilled (prompt + partial response) and join the running batch
between decode steps; a cut hands back every unfinished row; a caller that left stops it
at the next decode step.
"""

from __future__ import annotations

import time

import torch

from rlhfless.api.wire import ActorRequest, RolloutPrompt
from rlhfless.functions import cancel
from rlhfless.functions.device import on_device
from rlhfless.functions.engines.base import RolloutControl, RolloutLedger, sample
from rlhfless.functions.versions import VersionedCache
from rlhfless.model.generation import GenerationSession, Row
from rlhfless.model.materialize import load_from_store
from rlhfless.model.sampler import prompt_key
from rlhfless.model.tokenizer import Tokenizer
from rlhfless.store import WeightStore


def _rows(prompts: list[RolloutPrompt]) -> list[Row]:
    rows = []
    for p in prompts:
        prompt = p.prompt_ids.tolist()
        for k, index in enumerate(p.sample_indices):
            prefix = p.prefixes[k].tolist() if p.prefixes is not None else []
            rows.append(Row(prompt=prompt, key=prompt_key(p.key), index=index, tag=p.key,
                            response=prefix, max_new=p.max_new_tokens))
    return rows


class TransformersEngine:
    def __init__(self, store: WeightStore, dedup_prefill: bool = True):
        self.models = VersionedCache(store, lambda v: self._load(store, v))
        self.dedup_prefill = dedup_prefill

    @staticmethod
    def _load(store: WeightStore, version: int) -> tuple[torch.nn.Module, Tokenizer]:
        model, tok = load_from_store(store, version)
        return on_device(model), tok

    def loaded_version(self) -> int | None:
        return self.models.version

    def warm(self, version: int) -> None:
        self.models.get(version)

    def rollout(self, request: ActorRequest, ledger: RolloutLedger,
                control: RolloutControl) -> None:
        model, tok = self.models.get(request.weights_version)
        session = GenerationSession(model, tok, request.max_new_tokens, request.temperature,
                                    request.top_p, request.seed, self.dedup_prefill)
        rows = _rows(request.prompts)
        for row in rows:
            session.check(row.prompt, row.response)  # refuse before the stream starts
        ledger.accept()
        started = time.perf_counter()
        prefixes = sum(len(r.response) for r in rows)

        def report(done: list[Row]) -> None:
            for row in done:
                ledger.finish(sample(row.tag, row.index, row.response, row.logprobs, True,
                                     row.finished_at))

        report(session.add(rows))
        while True:
            cancel.check()  # the caller left: stop here (the session's cache is dropped)
            merges, cut = control.take()
            if merges:
                ledger.hold(merges, merged=True)
                new = _rows(merges)
                prefixes += sum(len(r.response) for r in new)
                report(session.add(new))
            if cut:
                unfinished = [sample(r.tag, r.index, r.response, r.logprobs, False)
                              for r in session.unfinished()]
                session.release()
                ledger.cut(unfinished, self._stats(session, started, prefixes))
                return
            if not session.live:
                if control.close_if_idle():
                    break
                continue
            report(session.step())
        ledger.end(self._stats(session, started, prefixes))

    @staticmethod
    def _stats(session: GenerationSession, started: float, prefixes: int) -> dict[str, float]:
        rows = session.rows
        return {
            "generate_s": time.perf_counter() - started,
            "decode_steps": float(session.steps),
            "batch_size": float(len(rows)),
            "tokens": float(sum(len(r.response) for r in rows) - prefixes),
            "prompt_tokens": float(session.prompt_tokens),
            "prefill_tokens_saved": float(session.prefill_tokens_saved),
            "finished": float(sum(r.reason is not None for r in rows)),
        }

"""Cut-and-migrate through the real actor function: same samples as uncut generation."""

from __future__ import annotations

import asyncio

from rlhfless.api.wire import REQUESTS
from rlhfless.driver.rollout import PromptItem, RolloutSettings, run_rollout
from rlhfless.functions.serve import build_handler
from rlhfless.model.tokenizer import load_tokenizer
from rlhfless.scheduling.migrate import plan_migration
from rlhfless.scheduling.profile import Profile


class InProcessRuntime:
    """Runtime protocol over handlers in this process (no HTTP), counting scale calls."""

    def __init__(self, job, store):
        self.handlers = {}
        self.job, self.store = job, store
        self.scaled: list[tuple[str, int]] = []

    async def scale(self, stage, n):
        self.scaled.append((stage, n))

    async def invoke(self, stage, payload):
        if stage not in self.handlers:
            self.handlers[stage] = build_handler(stage, self.job, self.store)
        request = REQUESTS[stage].model_validate(payload)
        return self.handlers[stage].handle(request).model_dump(mode="json")


def _rollout(job, store, items, bins, cut):
    settings = RolloutSettings(group_size=4, max_new_tokens=48, temperature=1.0, top_p=1.0,
                               seed=11, cut_fraction=cut)

    def migration_bins(unfinished, remaining):
        return plan_migration(remaining, 2, Profile(), keys=[s.key for s in unfinished]).bins

    runtime = InProcessRuntime(job, store)
    result = asyncio.run(run_rollout(runtime, items, bins, 0, settings, "t", [],
                                     migration_bins))
    return result, runtime


def test_cut_and_migrated_samples_equal_uncut_generation(tiny_store):
    job, store = tiny_store
    tok = load_tokenizer(store.base_dir / "tokenizer")
    items = [PromptItem(key=f"p{i}", text=t, prompt_ids=tok.encode(tok.render_prompt(t)),
                        meta={}) for i, t in enumerate(["one", "two", "three", "four"])]
    bins = [[0, 1], [2, 3]]
    uncut, _ = _rollout(job, store, items, bins, cut=None)
    cut, runtime = _rollout(job, store, items, bins, cut=0.25)
    assert cut.migrated > 0, "the cut rule must leave unfinished samples to migrate"
    assert cut.migration_actors == 1  # the tail continues on fewer actors than 2
    assert ("actor", 1) in runtime.scaled
    for item in items:
        a, b = uncut.samples[item.key], cut.samples[item.key]
        assert [s.index for s in a] == [s.index for s in b] == [0, 1, 2, 3]
        for sa, sb in zip(a, b, strict=True):
            assert sa.response == sb.response
            assert len(sb.logprobs) == len(sb.response)
            assert max(abs(x - y) for x, y in zip(sa.logprobs, sb.logprobs, strict=True)) < 1e-5
            assert sb.finished

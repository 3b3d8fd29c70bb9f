"""TrainBatch layout, padding, and advantages built from scored rollouts."""

from types import SimpleNamespace

import pytest
import torch

from rlhfless.algo import gae_advantages, grpo_advantages, token_level_rewards
from rlhfless.api.spec import AlgorithmSpec
from rlhfless.train import (
    TrainBatch,
    gae_from_rewards,
    group_advantages,
    make_train_batch,
    pad_ragged,
)

PROMPTS = [[5, 6], [7]]
GROUPS = [[[1, 2, 3], [4]], [[8, 9], [], [10]]]


def _ragged(fill: float = 0.0):
    return [[torch.full((len(r),), fill) for r in g] for g in GROUPS]


def test_train_batch_validates_shapes():
    batch = TrainBatch(PROMPTS, GROUPS, _ragged(1.0))
    assert batch.num_responses == 5 and batch.num_tokens == 7 and batch.max_response_len == 3
    bad = _ragged()
    bad[1][0] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"ref_logprobs\[1\] must match the response lengths"):
        TrainBatch(PROMPTS, GROUPS, _ragged(), ref_logprobs=bad)
    with pytest.raises(ValueError, match="2 prompts but 1 groups"):
        TrainBatch(PROMPTS, GROUPS[:1], _ragged()[:1])
    with pytest.raises(ValueError, match="advantages must have one entry per prompt"):
        TrainBatch(PROMPTS, GROUPS, _ragged()[:1])
    with pytest.raises(ValueError, match="empty"):
        TrainBatch([[], [7]], GROUPS, _ragged())


def test_from_lists_round_trip():
    lists = {
        "prompts": PROMPTS,
        "groups": GROUPS,
        "advantages": [[[0.5, 0.5, 0.5], [-1.0]], [[2.0, 2.0], [], [0.0]]],
        "old_logprobs": [[[-1.0, -2.0, -3.0], [-4.0]], [[-5.0, -6.0], [], [-7.0]]],
    }
    batch = TrainBatch.from_lists(**lists)
    assert batch.old_logprobs[0][0].dtype == torch.float32
    out = batch.to_lists()
    assert out["advantages"] == lists["advantages"] and out["ref_logprobs"] is None
    assert TrainBatch.from_lists(**out).to_lists() == out
    with pytest.raises(TypeError, match="unknown TrainBatch fields: rewards"):
        TrainBatch.from_lists(rewards=[], **lists)


def test_pad_ragged():
    mat, mask = pad_ragged([torch.tensor([1.0, 2.0]), torch.tensor([3.0])], length=4)
    torch.testing.assert_close(mat, torch.tensor([[1.0, 2.0, 0, 0], [3.0, 0, 0, 0]]))
    torch.testing.assert_close(mask, torch.tensor([[1.0, 1, 0, 0], [1.0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="more than the width"):
        pad_ragged([torch.zeros(3)], length=2)


def test_group_advantages_broadcast_per_response():
    rewards = [[1.0, 0.0], [1.0, 1.0, 0.0]]
    adv = group_advantages(rewards, GROUPS, "grpo")
    flat = grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1, 1]))
    k = 0
    for p, group in enumerate(GROUPS):
        for i, resp in enumerate(group):
            assert adv[p][i].shape == (len(resp),)
            assert torch.all(adv[p][i] == flat[k])
            k += 1
    dr = group_advantages(rewards, GROUPS, "drgrpo")
    assert dr[0][0][0].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one value per response"):
        group_advantages([[1.0], [1.0, 1.0, 0.0]], GROUPS)


def test_gae_from_rewards_puts_reward_on_last_token():
    values = [[torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.4])],
              [torch.tensor([0.5, 0.6]), torch.zeros(0), torch.tensor([0.7])]]
    rewards = [[1.0, -1.0], [2.0, 5.0, 0.0]]
    adv, ret = gae_from_rewards(rewards, values, GROUPS, gamma=0.9, lam=0.8, whiten=False)
    # Compare with the tensor function on the padded batch.
    v, mask = pad_ragged([t for g in values for t in g])
    seq = torch.tensor([1.0, -1.0, 2.0, 5.0, 0.0])
    ref_adv, ref_ret = gae_advantages(token_level_rewards(seq, mask), v, mask, 0.9, 0.8)
    torch.testing.assert_close(adv[0][0], ref_adv[0, :3])
    torch.testing.assert_close(ret[1][0], ref_ret[2, :2])
    assert adv[1][1].numel() == 0
    # one-token response: A = r - V, return = r
    assert adv[0][1].item() == pytest.approx(-1.4) and ret[0][1].item() == pytest.approx(-1.0)


def test_make_train_batch_per_algorithm():
    grpo = make_train_batch(AlgorithmSpec(name="grpo"), PROMPTS, GROUPS,
                            [[1.0, 0.0], [1.0, 1.0, 0.0]])
    assert grpo.returns is None and grpo.advantages[0][0][0] > 0 > grpo.advantages[0][1][0]
    values = [[torch.zeros(len(r)) for r in g] for g in GROUPS]
    ppo_spec = AlgorithmSpec(name="ppo")
    ppo = make_train_batch(ppo_spec, PROMPTS, GROUPS, [[1.0, 0.0], [1.0, 1.0, 0.0]],
                           values=values)
    assert ppo.old_values is values and ppo.returns is not None
    flat = torch.cat([a for g in ppo.advantages for a in g])
    assert abs(flat.mean().item()) < 1e-5  # whitened by default
    with pytest.raises(ValueError, match="needs the critic's values"):
        make_train_batch(ppo_spec, PROMPTS, GROUPS, [[1.0, 0.0], [1.0, 1.0, 0.0]])
    ns = SimpleNamespace(advantage="drgrpo")
    dr = make_train_batch(ns, PROMPTS, GROUPS, [[1.0, 0.0], [3.0, 0.0, 0.0]])
    assert dr.advantages[1][0][0].item() == pytest.approx(2.0)

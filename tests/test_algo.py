"""RL math against hand-computed values and textbook formulas (masks and edge cases)."""

import math

import pytest
import torch

from rlhfless.algo import (
    ADVANTAGES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate,
    drgrpo_advantages,
    entropy_from_logits,
    gae_advantages,
    get_advantage_fn,
    get_policy_loss,
    grpo_advantages,
    kl_penalty,
    masked_entropy,
    masked_mean,
    masked_whiten,
    token_level_rewards,
    value_loss,
)

# ---------------------------------------------------------------- group advantages


def test_grpo_hand_computed_groups():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 2.0, 2.0, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 7, 7, 3])  # ids need not be contiguous
    adv = grpo_advantages(rewards, groups, eps=1e-12)
    # group 0: mean 0.75, unbiased std sqrt((3 * 0.25^2 + 0.75^2) / 3) = 0.5
    expected = torch.tensor([0.5, -1.5, 0.5, 0.5, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)


def test_grpo_matches_torch_std_formula_on_random_groups():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(24, generator=gen)
    groups = torch.arange(24) // 6
    adv = grpo_advantages(rewards, groups)
    for g in range(4):
        r = rewards[groups == g]
        torch.testing.assert_close(adv[groups == g], (r - r.mean()) / (r.std() + 1e-6))


def test_grpo_equal_rewards_and_single_samples_are_zero_not_nan():
    rewards = torch.tensor([0.3, 0.3, 0.3, 1.0])
    adv = grpo_advantages(rewards, torch.tensor([0, 0, 0, 1]))
    assert torch.isfinite(adv).all()
    assert adv.abs().max() < 1e-6


def test_drgrpo_subtracts_mean_only():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = drgrpo_advantages(rewards, groups)
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 1.0, -1.0]))


def test_group_advantages_accept_integer_rewards():
    adv = grpo_advantages(torch.tensor([1, 0]), torch.tensor([0, 0]))
    assert adv.dtype == torch.float32
    assert adv[0] > 0 > adv[1]


def test_registry_and_unknown_name():
    assert {"grpo", "drgrpo", "gae"} <= set(ADVANTAGES)
    with pytest.raises(ValueError, match="known: drgrpo, gae, grpo"):
        get_advantage_fn("nope")


# ---------------------------------------------------------------- GAE


def test_gae_hand_computed():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae_advantages(r, v, torch.ones(1, 3), gamma=0.9, lam=0.8)
    # A2 = 1 - 0.7; A1 = (0.9*0.7 - 0.6) + 0.72*A2; A0 = (0.9*0.6 - 0.5) + 0.72*A1
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0]]))


def test_gae_lambda_one_is_monte_carlo_return_minus_value():
    gen = torch.Generator().manual_seed(1)
    r, v = torch.rand(3, 5, generator=gen), torch.rand(3, 5, generator=gen)
    adv, ret = gae_advantages(r, v, torch.ones(3, 5), gamma=1.0, lam=1.0)
    mc = torch.flip(torch.cumsum(torch.flip(r, [1]), 1), [1])
    torch.testing.assert_close(ret, mc)
    torch.testing.assert_close(adv, mc - v)


def _gae_reference(r, v, gamma, lam):
    """Textbook recursion on one unpadded sequence."""
    out, last = [0.0] * len(r), 0.0
    for t in reversed(range(len(r))):
        nv = v[t + 1] if t + 1 < len(r) else 0.0
        last = r[t] + gamma * nv - v[t] + gamma * lam * last
        out[t] = last
    return out


def test_gae_skips_masked_positions_like_removing_them():
    gen = torch.Generator().manual_seed(2)
    r, v = torch.rand(4, 7, generator=gen), torch.rand(4, 7, generator=gen)
    mask = (torch.rand(4, 7, generator=gen) > 0.35).float()
    mask[3] = 0.0  # a fully masked row
    adv, ret = gae_advantages(r, v, mask, gamma=0.95, lam=0.9)
    for b in range(4):
        keep = mask[b] > 0
        ref = _gae_reference(r[b][keep].tolist(), v[b][keep].tolist(), 0.95, 0.9)
        torch.testing.assert_close(adv[b][keep], torch.tensor(ref))
        torch.testing.assert_close(ret[b][keep], torch.tensor(ref) + v[b][keep])
        assert (adv[b][~keep] == 0).all() and (ret[b][~keep] == 0).all()
    assert torch.isfinite(adv).all()


def test_gae_whiten_normalises_masked_tokens_only():
    gen = torch.Generator().manual_seed(3)
    r, v = torch.rand(2, 6, generator=gen), torch.rand(2, 6, generator=gen)
    mask = torch.tensor([[1.0] * 6, [1.0] * 3 + [0.0] * 3])
    raw, ret_raw = gae_advantages(r, v, mask, whiten=False)
    adv, ret = gae_advantages(r, v, mask, whiten=True)
    torch.testing.assert_close(ret, ret_raw)  # returns stay unwhitened
    vals = adv[mask > 0]
    assert abs(vals.mean().item()) < 1e-5 and abs(vals.std().item() - 1.0) < 1e-4
    assert (adv[mask == 0] == 0).all()
    torch.testing.assert_close(adv, masked_whiten(raw, mask))


def test_token_level_rewards_on_last_real_token():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    out = token_level_rewards(torch.tensor([2.0, -1.0, 5.0]), mask)
    expected = torch.tensor([[0, 2.0, 0, 0], [0, 0, 0, -1.0], [0, 0, 0, 0]])
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------- aggregation


def test_aggregations_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "seq-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)
    assert aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / 9)
    with pytest.raises(ValueError, match="unknown loss aggregation 'x'"):
        aggregate(loss, mask, "x")


@pytest.mark.parametrize(
    "agg", ["token-mean", "seq-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_fully_masked_batch_gives_zero_not_nan(agg):
    out = aggregate(torch.ones(2, 3), torch.zeros(2, 3), agg)
    assert out.item() == 0.0
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


# ---------------------------------------------------------------- policy loss


def test_ppo_clip_hand_computed():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0, 9.0]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # last token is padding
    loss, stats = POLICY_LOSSES["ppo_clip"](logp, old, adv, mask, clip_eps=0.2, agg="token-mean")
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: 1.0
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.0) / 3)
    assert stats["clipfrac"] == pytest.approx(1 / 3)
    assert stats["approx_kl"] == pytest.approx(-(math.log(1.5) + math.log(0.5)) / 3)


def test_ppo_clip_gradients_vanish_on_clipped_tokens_only():
    logp = torch.log(torch.tensor([[1.5, 0.9]])).requires_grad_(True)
    loss, _ = POLICY_LOSSES["ppo_clip"](
        logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), clip_eps=0.2
    )
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0
    # d/dlogp of -A * exp(logp) / 2 = -0.9 / 2
    assert logp.grad[0, 1].item() == pytest.approx(-0.45)


def test_ppo_on_policy_loss_is_minus_mean_advantage():
    gen = torch.Generator().manual_seed(4)
    logp, adv = -torch.rand(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    mask = torch.ones(3, 5)
    loss, stats = POLICY_LOSSES["ppo_clip"](logp, logp.clone(), adv, mask)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == pytest.approx(0.0, abs=1e-7)


def test_dual_clip_bounds_negative_advantage_loss():
    logp = torch.log(torch.tensor([[5.0, 5.0]]))
    adv = torch.tensor([[-1.0, 1.0]])
    fn = POLICY_LOSSES["ppo_clip"]
    plain, _ = fn(logp, torch.zeros(1, 2), adv, torch.ones(1, 2), clip_eps=0.2)
    dual, stats = fn(logp, torch.zeros(1, 2), adv, torch.ones(1, 2), clip_eps=0.2, dual_clip=3.0)
    # token 0: max(5, 1.2) = 5 -> min(5, 3) = 3; token 1: max(-5, -1.2) = -1.2 either way
    assert plain.item() == pytest.approx((5.0 - 1.2) / 2)
    assert dual.item() == pytest.approx((3.0 - 1.2) / 2)
    assert stats["dual_clipfrac"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        fn(logp, torch.zeros(1, 2), adv, torch.ones(1, 2), dual_clip=0.5)


def test_ppo_seq_mean_weighs_sequences_equally():
    logp = torch.zeros(2, 4)
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    tok, _ = POLICY_LOSSES["ppo_clip"](logp, logp, adv, mask, agg="token-mean")
    seq, _ = POLICY_LOSSES["ppo_clip"](logp, logp, adv, mask, agg="seq-mean")
    assert tok.item() == pytest.approx(-7 / 5)
    assert seq.item() == pytest.approx(-(1 + 3) / 2)


def test_ppo_extreme_ratio_stays_finite():
    logp = torch.tensor([[0.0, 0.0]])
    old = torch.tensor([[-500.0, -1e9]])
    loss, stats = POLICY_LOSSES["ppo_clip"](logp, old, torch.tensor([[-1.0, -1.0]]),
                                            torch.tensor([[1.0, 0.0]]))
    assert math.isfinite(loss.item()) and math.isfinite(stats["approx_kl"])


# ---------------------------------------------------------------- value loss


def test_value_loss_hand_computed():
    values = torch.tensor([[1.0, 2.0, 7.0]])
    old = torch.tensor([[0.5, 2.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    # token 0: max((1-2)^2, (0.7-2)^2) = 1.69 (clipped); token 1: 4
    assert loss.item() == pytest.approx(0.5 * (1.69 + 4.0) / 2)
    assert stats["vf_clipfrac"] == pytest.approx(0.5)
    unclipped, _ = value_loss(values, old, returns, mask, clip=None)
    assert unclipped.item() == pytest.approx(0.5 * (1.0 + 4.0) / 2)


# ---------------------------------------------------------------- KL


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(KL_ESTIMATORS["k1"](logp, ref), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(KL_ESTIMATORS["k2"](logp, ref), torch.tensor([0.125, 0.5]))
    k3 = torch.tensor([math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1])
    torch.testing.assert_close(KL_ESTIMATORS["k3"](logp, ref), k3)
    with pytest.raises(ValueError, match="known: k1, k2, k3"):
        kl_penalty(logp, ref, "k9")


def test_kl_estimators_are_unbiased_in_expectation():
    gen = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(6, generator=gen), 0)
    q = torch.softmax(torch.randn(6, generator=gen), 0)
    true_kl = (p * (p.log() - q.log())).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    logp, ref = p.log()[x], q.log()[x]
    for name in ("k1", "k3"):
        assert kl_penalty(logp, ref, name).mean().item() == pytest.approx(true_kl, rel=0.05)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()


def test_k3_is_clamped_for_extreme_log_ratios():
    out = KL_ESTIMATORS["k3"](torch.tensor([-1000.0, 0.0]), torch.tensor([0.0, -1000.0]))
    assert torch.isfinite(out).all() and out.max().item() <= 10.0


# ---------------------------------------------------------------- entropy


def test_entropy_from_logits():
    assert entropy_from_logits(torch.zeros(3, 8))[0].item() == pytest.approx(math.log(8))
    one_hot = torch.tensor([0.0, -math.inf, -math.inf])
    assert entropy_from_logits(one_hot).item() == pytest.approx(0.0)
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, 11, generator=gen)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    expected = (entropy_from_logits(logits) * mask).sum() / 3
    torch.testing.assert_close(masked_entropy(logits, mask), expected)


def test_vanilla_pg_is_unclipped_and_registry_names_are_checked():
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    adv = torch.tensor([[1.0, 2.0]])
    loss, stats = POLICY_LOSSES["vanilla"](logp, torch.zeros(1, 2), adv, torch.ones(1, 2))
    assert loss.item() == pytest.approx(-(1.5 * 1.0 + 0.5 * 2.0) / 2)
    assert stats["clipfrac"] == 0.0
    with pytest.raises(ValueError, match="unknown policy loss 'x'; known: ppo_clip, vanilla"):
        get_policy_loss("x")

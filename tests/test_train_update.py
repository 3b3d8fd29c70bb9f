"""PolicyTrainer on tiny random GPT-2 models: correctness of one step, then learning loops."""

import copy
import io

import pytest
import torch

from rlhfless.algo import entropy_from_logits
from rlhfless.api.spec import AlgorithmSpec, RewardSpec, TinyModelSpec, TrainerSpec
from rlhfless.model.generation import generate
from rlhfless.model.loading import load_tiny
from rlhfless.model.logprobs import grouped_logprobs, sequence_logprobs
from rlhfless.model.value import ValueModel
from rlhfless.rewards import compute_rewards
from rlhfless.train import PolicyTrainer, TrainBatch, make_train_batch

TINY = TinyModelSpec(n_layer=2, n_embd=64, n_head=4, n_positions=128)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two OpenMP
    threads per process made the learning loops ~10x slower (spin-waiting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(seed: int = 0):
    return load_tiny(TINY.model_copy(update={"seed": seed}))


def _algo(**kw) -> AlgorithmSpec:
    base = {"name": "grpo", "lr": 1e-3, "mini_batch_size": 16, "kl_beta": 0.0}
    return AlgorithmSpec(**{**base, **kw})


def _fixed_batch(gen_seed: int = 0):
    """Two prompts x three random responses (one of them empty), rewards favouring response 0."""
    g = torch.Generator().manual_seed(gen_seed)
    prompts = [[72, 105, 58], [97, 98]]
    groups = [[torch.randint(2, 128, (n,), generator=g).tolist() for n in (5, 3, 4)],
              [torch.randint(2, 128, (n,), generator=g).tolist() for n in (2, 0, 6)]]
    rewards = [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    return prompts, groups, rewards


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def test_logprobs_and_entropy_match_naive_forward():
    model, _ = _tiny()
    trainer = PolicyTrainer(model, _algo())
    prompts, groups, _ = _fixed_batch()
    with torch.no_grad():
        logp, ent = trainer.logprobs_and_entropy(prompts, groups)
    flat_prompts = [p for p, g in zip(prompts, groups, strict=True) for _ in g]
    naive = sequence_logprobs(model, flat_prompts, [r for g in groups for r in g])
    for mine, ref in zip(logp, naive, strict=True):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)
    # entropy of the first response's next-token distributions, from full logits
    ids = torch.tensor([prompts[0] + groups[0][0]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompts[0]) - 1 : -1]
    torch.testing.assert_close(ent[0], entropy_from_logits(logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("advantage", "agg"),
    [("grpo", "token-mean"), ("grpo", "seq-mean"), ("drgrpo", "seq-mean-token-sum-norm")],
)
def test_one_step_moves_logprobs_towards_advantage(advantage, agg):
    model, _ = _tiny()
    prompts, groups, rewards = _fixed_batch()
    # model_copy skips validation: the spec does not list every aggregation (yet)
    algo = _algo(lr=1e-3, advantage=advantage).model_copy(update={"loss_agg": agg})
    batch = make_train_batch(algo, prompts, groups, rewards)
    with torch.no_grad():
        before = grouped_logprobs(model, prompts, groups)
    stats = PolicyTrainer(model, algo).step(batch)
    with torch.no_grad():
        after = grouped_logprobs(model, prompts, groups)
    for p in range(2):
        assert after[p][0].sum() > before[p][0].sum()  # rewarded response: more likely
        assert after[p][2].sum() < before[p][2].sum()  # unrewarded: less likely
    # old log-probs were recomputed with the same weights: the first update is on-policy
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert stats["clipfrac"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["num_minibatches"] == 1 and stats["num_tokens"] == 20
    assert stats["grad_norm"] > 0 and "kl" not in stats


def test_zero_advantages_leave_weights_unchanged():
    model, _ = _tiny()
    prompts, groups, _ = _fixed_batch()
    algo = _algo(lr=1e-2, ppo_epochs=2)
    batch = make_train_batch(algo, prompts, groups, [[0.5] * 3, [0.5] * 3])
    before = _params(model)
    stats = PolicyTrainer(model, algo).step(batch)
    assert torch.equal(_params(model), before)
    assert stats["loss"] == 0.0 and stats["num_minibatches"] == 2


def test_entropy_bonus_raises_entropy():
    model, _ = _tiny()
    with torch.no_grad():  # sharpen the (tied) output layer: start well below max entropy
        model.get_output_embeddings().weight.mul_(8.0)
    prompts, groups, _ = _fixed_batch()
    algo = _algo(lr=1e-3, entropy_coef=1.0)
    batch = make_train_batch(algo, prompts, groups, [[0.5] * 3, [0.5] * 3])
    trainer = PolicyTrainer(model, algo)
    entropies = [trainer.step(batch)["entropy"] for _ in range(4)]
    assert entropies[0] < 4.0  # log(128) = 4.85 is the maximum
    assert entropies[-1] > entropies[0] + 0.3, entropies


def test_kl_penalty_pulls_towards_reference():
    model, _ = _tiny()
    ref_model = copy.deepcopy(model)
    prompts, groups, _ = _fixed_batch()
    with torch.no_grad():  # push the policy away from the reference first
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        ref = [[t.clone() for t in g] for g in grouped_logprobs(ref_model, prompts, groups)]
    algo = _algo(lr=3e-3, kl_beta=1.0, kl_estimator="k3")
    batch = make_train_batch(algo, prompts, groups, [[0.5] * 3, [0.5] * 3], ref_logprobs=ref)
    trainer = PolicyTrainer(model, algo)
    kls = [trainer.step(batch)["kl"] for _ in range(5)]
    assert kls[-1] < kls[0] and kls[0] > 0


def test_minibatches_and_argument_errors():
    model, _ = _tiny()
    prompts, groups, rewards = _fixed_batch()
    algo = _algo(mini_batch_size=2, ppo_epochs=3)
    stats = PolicyTrainer(model, algo).step(make_train_batch(algo, prompts, groups, rewards))
    assert stats["num_minibatches"] == 3 * 3  # 5 non-empty responses -> 3 mini-batches/epoch
    empty = make_train_batch(algo, prompts, [[[], []], [[]]], [[1.0, 0.0], [0.0]])
    assert PolicyTrainer(model, algo).step(empty)["num_minibatches"] == 0
    with pytest.raises(ValueError, match="ref_logprobs"):
        PolicyTrainer(model, _algo(kl_beta=0.1)).step(
            make_train_batch(algo, prompts, groups, rewards))
    with pytest.raises(ValueError, match="needs a critic"):
        PolicyTrainer(model, AlgorithmSpec(name="ppo"))


def test_optimizer_state_round_trip_resumes_exactly():
    prompts, groups, rewards = _fixed_batch()
    algo = _algo(lr=3e-3)
    batch = make_train_batch(algo, prompts, groups, rewards)

    straight, _ = _tiny()
    trainer = PolicyTrainer(straight, algo)
    trainer.step(batch)
    trainer.step(batch)

    first, _ = _tiny()
    t1 = PolicyTrainer(first, algo)
    t1.step(batch)
    buffer = io.BytesIO()
    torch.save(t1.state_dict(), buffer)  # how a stateless trainer function keeps it
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, _ = _tiny()
    resumed.load_state_dict(first.state_dict())
    t2 = PolicyTrainer(resumed, algo)
    t2.load_state_dict(saved)
    assert t2.steps_done == 1
    t2.step(batch)
    torch.testing.assert_close(_params(resumed), _params(straight), atol=1e-6, rtol=0)

    fresh, _ = _tiny()
    t3 = PolicyTrainer(fresh, algo)
    t3.step(batch)  # without the saved moments Adam takes a different (first) step
    assert not torch.allclose(_params(fresh), _params(straight), atol=1e-6)
    with pytest.raises(ValueError, match="backend"):
        t3.load_state_dict({**saved, "backend": "deepspeed"})


def test_grad_checkpointing_gives_the_same_update():
    prompts, groups, rewards = _fixed_batch()
    algo = _algo(lr=1e-3)
    batch = make_train_batch(algo, prompts, groups, rewards)
    plain, _ = _tiny()
    ckpt, _ = _tiny()
    s_plain = PolicyTrainer(plain, algo).step(batch)
    s_ckpt = PolicyTrainer(ckpt, algo, TrainerSpec(grad_checkpointing=True)).step(batch)
    assert s_ckpt["loss"] == pytest.approx(s_plain["loss"], abs=1e-6)
    # Different (full-sequence) forward, same math: Adam steps agree to a few % of lr.
    torch.testing.assert_close(_params(ckpt), _params(plain), atol=5e-5, rtol=0)


# ---------------------------------------------------------------- learning loops


def _rollout(model, tok, texts, group_size, max_new_tokens, seed, reward):
    prompts = [tok.encode(tok.render_prompt(t)) for t in texts]
    res = generate(model, tok, prompts, n=group_size, max_new_tokens=max_new_tokens,
                   temperature=1.0, seed=seed)
    groups = [[res[i * group_size + j]["response"] for j in range(group_size)]
              for i in range(len(texts))]
    old = [[torch.tensor(res[i * group_size + j]["logprobs"]) for j in range(group_size)]
           for i in range(len(texts))]
    rewards = [compute_rewards(reward, [t] * group_size, [tok.decode(r) for r in g])
               for t, g in zip(texts, groups, strict=True)]
    return prompts, groups, old, rewards


def test_grpo_learns_a_toy_reward():
    """2 prompts x 8 samples, 16 tokens, k3 KL to a frozen reference: share of 'a' -> ~1."""
    model, tok = _tiny()
    ref_model = copy.deepcopy(model)
    algo = _algo(group_size=8, lr=4e-3, kl_beta=0.01)
    trainer = PolicyTrainer(model, algo)
    reward = RewardSpec(name="target_char", args={"char": "a"})
    means = []
    for step in range(36):
        prompts, groups, old, rewards = _rollout(model, tok, ["Say a:", "abc"], 8, 16, step,
                                                 reward)
        with torch.no_grad():
            ref = list(grouped_logprobs(ref_model, prompts, groups))
        batch = make_train_batch(algo, prompts, groups, rewards, ref_logprobs=ref,
                                 old_logprobs=old)
        stats = trainer.step(batch)
        means.append(sum(map(sum, rewards)) / 16)
        if step == 0:
            # the sampler's log-probs equal the trainer's: the first update is on-policy
            assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-5)
    assert sum(means[:3]) / 3 < 0.1  # a random char model emits 'a' ~1/128 of the time
    assert sum(means[-4:]) / 4 > 0.8, means


def test_ppo_critic_learns_the_returns():
    """Reward = share of 'a' minus a length penalty (about -1 at first); a fresh critic
    predicts ~N(0, 1), so its value loss starts high and must fall."""
    model, tok = _tiny()
    critic = ValueModel(_tiny(seed=1)[0])
    algo = AlgorithmSpec(name="ppo", group_size=4, lr=2e-3, critic_lr=5e-3, mini_batch_size=8,
                         ppo_epochs=2, gamma=1.0, lam=0.95)
    trainer = PolicyTrainer(model, algo, critic=critic)
    reward = RewardSpec(name="combined", args={
        "weights": {"target_char": 1.0, "length_penalty": 1.0},
        "args": {"target_char": {"char": "a"}, "length_penalty": {"target": 0, "window": 4}},
    })
    losses = []
    for step in range(8):
        prompts, groups, old, rewards = _rollout(model, tok, ["Say a:", "abc", "xyz", "ok"], 4,
                                                 12, step, reward)
        with torch.no_grad():
            values = critic.grouped_values(prompts, groups)
        batch = make_train_batch(algo, prompts, groups, rewards, old_logprobs=old,
                                 values=values)
        stats = trainer.step(batch)
        losses.append(stats["value_loss"])
        assert {"vf_clipfrac", "critic_grad_norm", "clipfrac"} <= set(stats)
    assert losses[0] > 0.5
    assert max(losses[-3:]) < 0.1 * losses[0], losses


def test_ppo_recomputes_old_values_when_missing():
    model, _ = _tiny()
    critic = ValueModel(_tiny(seed=1)[0])
    prompts, groups, rewards = _fixed_batch()
    algo = AlgorithmSpec(name="ppo", lr=1e-3, critic_lr=1e-3, mini_batch_size=16)
    with torch.no_grad():
        values = critic.grouped_values(prompts, groups)
    full = make_train_batch(algo, prompts, groups, rewards, values=values)
    missing = TrainBatch(full.prompts, full.groups, full.advantages, returns=full.returns)
    s1 = PolicyTrainer(copy.deepcopy(model), algo, critic=copy.deepcopy(critic)).step(full)
    s2 = PolicyTrainer(copy.deepcopy(model), algo, critic=copy.deepcopy(critic)).step(missing)
    assert s1["value_loss"] == pytest.approx(s2["value_loss"], abs=1e-6)
    with pytest.raises(ValueError, match="returns"):
        PolicyTrainer(model, algo, critic=critic).step(
            TrainBatch(full.prompts, full.groups, full.advantages))

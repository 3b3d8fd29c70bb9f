"""The streaming learner core: groups one at a time, one optimizer step, the whole-batch
update (float summation order aside), whatever order the groups arrive in."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhfless.api.spec import AlgorithmSpec, TinyModelSpec
from rlhfless.model.loading import load_tiny
from rlhfless.model.logprobs import grouped_logprobs
from rlhfless.model.value import ValueModel
from rlhfless.train import PolicyTrainer, make_train_batch, optim
from rlhfless.train.streaming import GroupInput, LearnerStateError, StreamingLearner
from rlhfless.train.update import step_seed

TINY = TinyModelSpec(n_layer=2, n_embd=32, n_head=2, n_positions=64)
G, N = 3, 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(2, 128, (n,), generator=g).tolist()

    prompts = [ids(2, 6) for _ in range(N)]
    groups = [[ids(1, 9) for _ in range(G)] for _ in range(N)]
    rewards = [[float(torch.rand(1, generator=g)) for _ in range(G)] for _ in range(N)]
    return prompts, groups, rewards


def _flat(values) -> torch.Tensor:
    return torch.cat([v.detach().flatten() for v in values])


class _Grads:
    """Records the (normalised, pre-clip) gradient every optimizer step applies."""

    def __init__(self, monkeypatch):
        self.seen: list[torch.Tensor] = []
        original = optim.TorchAdamW.step

        def step(opt):
            self.seen.append(_flat(p.grad for p in opt.params))
            return original(opt)

        monkeypatch.setattr(optim.TorchAdamW, "step", step)


def _models(algo):
    policy, _ = load_tiny(TINY)
    reference = copy.deepcopy(policy).eval()
    critic = ValueModel(copy.deepcopy(policy)) if algo.name == "ppo" else None
    return policy, reference, critic


def _whole_batch(algo, data):
    """The barrier path: score everything, then PolicyTrainer.step on the whole batch."""
    prompts, groups, rewards = data
    policy, reference, critic = _models(algo)
    with torch.no_grad():
        ref = [list(x) for x in grouped_logprobs(reference, prompts, groups)] \
            if algo.kl_beta > 0 else None
        values = critic.grouped_values(prompts, groups) if critic is not None else None
    batch = make_train_batch(algo, prompts, groups, rewards, ref_logprobs=ref, values=values)
    stats = PolicyTrainer(policy, algo, critic=critic).step(batch, step_seed(0, 1))
    return policy, critic, stats


def _streamed(algo, data, order):
    prompts, groups, rewards = data
    policy, reference, critic = _models(algo)
    learner = StreamingLearner(PolicyTrainer(policy, algo, critic=critic), algo, G,
                               reference if algo.kl_beta > 0 else None)
    ids = [f"g{p}" for p in range(N)]
    learner.begin(1, ids, step_seed(0, 1))
    for p in order:
        assert learner.add_group(GroupInput(ids[p], prompts[p], groups[p], rewards[p]))
    return policy, critic, learner.finish()


def _algo(**kw) -> AlgorithmSpec:
    base = {"name": "grpo", "lr": 1e-3, "critic_lr": 1e-3, "mini_batch_size": 64}
    return AlgorithmSpec(**{**base, **kw})


CASES = {
    "grpo-token-mean-kl-entropy": _algo(kl_beta=0.1, entropy_coef=0.01),
    "grpo-seq-mean": _algo(kl_beta=0.05, loss_agg="seq-mean-token-sum"),
    "drgrpo-norm": _algo(advantage="drgrpo", loss_agg="seq-mean-token-sum-norm"),
    "ppo-whitened-gae-kl": _algo(name="ppo", kl_beta=0.05),
    "grpo-3-minibatches": _algo(kl_beta=0.1, mini_batch_size=5),
    "ppo-2-epochs-minibatches": _algo(name="ppo", mini_batch_size=4, ppo_epochs=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_streamed_update_equals_the_whole_batch_update(name, monkeypatch):
    algo = CASES[name]
    grads = _Grads(monkeypatch)
    data = _data()
    policy_a, critic_a, stats_a = _whole_batch(algo, data)
    barrier_grads = list(grads.seen)
    grads.seen.clear()
    policy_b, critic_b, stats_b = _streamed(algo, data, order=[2, 0, 3, 1])
    # The same optimizer steps with the same gradients, to float summation order...
    assert len(grads.seen) == len(barrier_grads) == stats_a["num_minibatches"] * (
        2 if critic_a is not None else 1)
    for a, b in zip(barrier_grads, grads.seen, strict=True):
        assert (a - b).abs().max() <= 2e-5 * a.abs().max()
    # ...hence the same weights (Adam's first step amplifies rounding in near-zero
    # gradients by up to lr, so the bound is a fraction of lr).
    assert (_flat(policy_a.parameters()) - _flat(policy_b.parameters())).abs().max() \
        < 0.2 * algo.lr
    if critic_a is not None:
        assert (_flat(critic_a.parameters()) - _flat(critic_b.parameters())).abs().max() \
            < 0.2 * algo.critic_lr
    assert stats_b["num_minibatches"] == stats_a["num_minibatches"]
    for key in ("loss", "pg_loss", "entropy", "kl", "value_loss", "grad_norm"):
        if key in stats_a:
            assert stats_b[key] == pytest.approx(stats_a[key], rel=1e-4, abs=1e-6), key
    moved = (_flat(policy_b.parameters()) - _flat(load_tiny(TINY)[0].parameters())).abs()
    assert moved.max() > 0.5 * algo.lr  # it did train


def test_arrival_order_changes_nothing_but_summation_order(monkeypatch):
    grads = _Grads(monkeypatch)
    algo, data = CASES["ppo-whitened-gae-kl"], _data(1)
    _streamed(algo, data, [0, 1, 2, 3])
    _streamed(algo, data, [3, 1, 0, 2])
    first, second = grads.seen[:2], grads.seen[2:]
    for a, b in zip(first, second, strict=True):
        assert (a - b).abs().max() <= 2e-5 * a.abs().max()


def test_first_pass_is_exactly_on_policy_and_streams_only_the_first_minibatch():
    prompts, groups, rewards = _data()
    policy, _, _ = _models(_algo())
    algo = _algo(mini_batch_size=5)
    learner = StreamingLearner(PolicyTrainer(policy, algo), algo, G)
    ids = [f"g{p}" for p in range(N)]
    learner.begin(7, ids, step_seed(0, 7))
    assert len(learner.first) == 5 and not learner.single_pass
    for p in range(N):
        learner.add_group(GroupInput(ids[p], prompts[p], groups[p], rewards[p]))
    stats = learner.finish()
    assert stats["streamed_responses"] == 5 and stats["num_minibatches"] == 3
    single = _algo()
    learner = StreamingLearner(PolicyTrainer(policy, single), single, G)
    learner.begin(8, ids, step_seed(0, 8))
    for p in range(N):
        learner.add_group(GroupInput(ids[p], prompts[p], groups[p], rewards[p]))
    stats = learner.finish()
    assert stats["streamed_responses"] == N * G and stats["num_minibatches"] == 1
    assert stats["ratio_mean"] == 1.0 and stats["approx_kl"] == 0.0  # exactly on-policy


def test_protocol_errors_are_refused_clearly():
    prompts, groups, rewards = _data()
    policy, _, _ = _models(_algo())
    learner = StreamingLearner(PolicyTrainer(policy, _algo()), _algo(), G)
    group = GroupInput("g0", prompts[0], groups[0], rewards[0])
    with pytest.raises(LearnerStateError) as err:
        learner.add_group(group)
    assert err.value.code == "step_not_open"
    learner.begin(1, ["g0", "g1"], 0)
    assert learner.add_group(group) and not learner.add_group(group)  # counted once
    with pytest.raises(LearnerStateError) as err:
        learner.finish()
    assert err.value.code == "groups_missing" and "g1" in str(err.value)
    with pytest.raises(LearnerStateError, match="not part of step 1"):
        learner.add_group(GroupInput("g9", prompts[0], groups[0], rewards[0]))
    with pytest.raises(ValueError, match="groups have 3"):
        learner.add_group(GroupInput("g1", prompts[1], groups[1][:2], rewards[1][:2]))
    with pytest.raises(ValueError, match="empty response"):
        learner.add_group(GroupInput("g1", prompts[1], [[5], [], [6]], rewards[1]))
    with pytest.raises(ValueError, match="kl_beta > 0 needs the reference"):
        StreamingLearner(PolicyTrainer(policy, _algo(kl_beta=0.1)), _algo(kl_beta=0.1), G)


def test_a_learner_rebuilt_mid_step_produces_bit_identical_weights():
    """What a restarted learner does: same starting weights and optimizer state, begin
    again, the same groups in the same order: not one bit differs."""
    algo, data = _algo(kl_beta=0.1, mini_batch_size=5, ppo_epochs=2), _data(2)
    prompts, groups, rewards = data

    def run(policy, state, interrupt: bool) -> torch.Tensor:
        trainer = PolicyTrainer(policy, algo)
        trainer.load_state_dict(state)
        ref = copy.deepcopy(start).eval()
        learner = StreamingLearner(trainer, algo, G, ref)
        ids = [f"g{p}" for p in range(N)]
        learner.begin(2, ids, step_seed(0, 2))
        for p in range(N):
            if interrupt and p == 2:  # lost: a fresh learner on the same state
                trainer = PolicyTrainer(copy.deepcopy(start_after), algo)
                trainer.load_state_dict(state)
                learner = StreamingLearner(trainer, algo, G, ref)
                learner.begin(2, ids, step_seed(0, 2))
                for q in range(p):
                    learner.add_group(GroupInput(ids[q], prompts[q], groups[q], rewards[q]))
            learner.add_group(GroupInput(ids[p], prompts[p], groups[p], rewards[p]))
        learner.finish()
        return _flat(learner.trainer.model.parameters())

    start, _ = load_tiny(TINY)
    warmup = PolicyTrainer(copy.deepcopy(start), algo)  # a non-trivial optimizer state
    state = warmup.state_dict()
    start_after = copy.deepcopy(start)
    assert torch.equal(run(copy.deepcopy(start), state, False),
                       run(copy.deepcopy(start), state, True))

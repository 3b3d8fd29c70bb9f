"""The DeepSpeed backend (single process, gloo on CPU) gives the same update as plain torch.

The trainer skips DeepSpeed's shared-memory comm op (useless in one process), whose JIT
compile otherwise cost 45-150 s on the first initialize of a fresh environment.
"""

import copy
import io

import pytest
import torch

from rlhfless.api.spec import AlgorithmSpec, TinyModelSpec, TrainerSpec
from rlhfless.model.loading import load_tiny
from rlhfless.model.value import ValueModel
from rlhfless.train import PolicyTrainer, make_train_batch

pytest.importorskip("deepspeed")

TINY = TinyModelSpec(n_layer=2, n_embd=64, n_head=4, n_positions=128)
ALGO = AlgorithmSpec(name="grpo", lr=3e-3, mini_batch_size=16, max_grad_norm=0.5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch():
    g = torch.Generator().manual_seed(0)
    prompts = [[72, 105, 58], [97, 98]]
    groups = [[torch.randint(2, 128, (n,), generator=g).tolist() for n in (5, 3, 4)],
              [torch.randint(2, 128, (n,), generator=g).tolist() for n in (2, 7, 6)]]
    return make_train_batch(ALGO, prompts, groups, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.5]])


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_update_matches_torch(stage):
    base, _ = load_tiny(TINY)
    batch = _batch()
    ref_model = copy.deepcopy(base)
    ref = PolicyTrainer(ref_model, ALGO)
    ref_stats = [ref.step(batch) for _ in range(2)]

    ds_model = copy.deepcopy(base)
    trainer = PolicyTrainer(ds_model, ALGO, TrainerSpec(backend="deepspeed", zero_stage=stage))
    stats = [trainer.step(batch) for _ in range(2)]
    assert not torch.equal(_params(ds_model), _params(base))  # it trained
    torch.testing.assert_close(_params(trainer.model), _params(ref_model), atol=1e-5, rtol=0)
    for mine, theirs in zip(stats, ref_stats, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    assert stats[0]["grad_norm"] > ALGO.max_grad_norm  # so clipping was exercised


def test_deepspeed_optimizer_state_round_trip():
    base, _ = load_tiny(TINY)
    batch = _batch()
    spec = TrainerSpec(backend="deepspeed", zero_stage=2)
    straight = PolicyTrainer(copy.deepcopy(base), ALGO, spec)
    straight.step(batch)
    straight.step(batch)

    first = PolicyTrainer(copy.deepcopy(base), ALGO, spec)
    first.step(batch)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["backend"] == "deepspeed-zero2"
    resumed_model = copy.deepcopy(base)
    resumed_model.load_state_dict(first.model.state_dict())
    resumed = PolicyTrainer(resumed_model, ALGO, spec)
    resumed.load_state_dict(saved)
    resumed.step(batch)
    torch.testing.assert_close(_params(resumed.model), _params(straight.model), atol=1e-6,
                               rtol=0)
    zero0 = PolicyTrainer(copy.deepcopy(base), ALGO, TrainerSpec(backend="deepspeed"))
    with pytest.raises(ValueError, match="deepspeed-zero2"):
        zero0.load_state_dict(saved)


def test_deepspeed_ppo_matches_torch_for_policy_and_critic():
    base, _ = load_tiny(TINY)
    critic = ValueModel(load_tiny(TINY.model_copy(update={"seed": 1}))[0])
    algo = AlgorithmSpec(name="ppo", lr=1e-3, critic_lr=1e-3, mini_batch_size=16)
    batch = _batch()
    with torch.no_grad():
        values = critic.grouped_values(batch.prompts, batch.groups)
    rewards = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.5]]
    ppo_batch = make_train_batch(algo, batch.prompts, batch.groups, rewards, values=values)
    runs = {}
    for backend in ("torch", "deepspeed"):
        trainer = PolicyTrainer(copy.deepcopy(base), algo, TrainerSpec(backend=backend),
                                critic=copy.deepcopy(critic))
        losses = [trainer.step(ppo_batch)["value_loss"] for _ in range(3)]
        runs[backend] = (losses, _params(trainer.model), _params(trainer.critic))
    (t_loss, t_pol, t_crit), (d_loss, d_pol, d_crit) = runs["torch"], runs["deepspeed"]
    assert d_loss == pytest.approx(t_loss, rel=1e-4)
    assert len(set(d_loss)) == 3  # the critic moved between steps
    torch.testing.assert_close(d_pol, t_pol, atol=1e-5, rtol=0)
    torch.testing.assert_close(d_crit, t_crit, atol=1e-5, rtol=0)


def test_single_process_skips_the_shm_comm_jit_build():
    import deepspeed

    base, _ = load_tiny(TINY)
    PolicyTrainer(base, ALGO, TrainerSpec(backend="deepspeed"))
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False


def test_deepspeed_rejects_zero3():
    base, _ = load_tiny(TINY)
    with pytest.raises(ValueError, match="ZeRO stage 0 or 2"):
        PolicyTrainer(base, ALGO, TrainerSpec(backend="deepspeed", zero_stage=3))


@pytest.mark.parametrize("stage", [0, 2])
def test_streaming_learner_on_deepspeed_matches_the_torch_whole_batch_update(stage):
    """ZeRO-0 streams gradients (they sit in .grad); ZeRO-2 keeps them partitioned, so its
    learner streams only the forward-only work and backpropagates in finish: same update."""
    from rlhfless.train.streaming import GroupInput, StreamingLearner
    from rlhfless.train.update import step_seed

    algo = ALGO.model_copy(update={"mini_batch_size": 64, "lr": 1e-3})
    batch = _batch()
    base, _ = load_tiny(TINY)
    ref_model = copy.deepcopy(base)
    PolicyTrainer(ref_model, algo).step(make_train_batch(
        algo, batch.prompts, batch.groups, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.5]]), step_seed(0, 1))
    trainer = PolicyTrainer(copy.deepcopy(base), algo,
                            TrainerSpec(backend="deepspeed", zero_stage=stage))
    learner = StreamingLearner(trainer, algo, 3)
    assert learner.streams_gradients == (stage == 0)
    learner.begin(1, ["a", "b"], step_seed(0, 1))
    rewards = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.5]]
    for gid, p in (("b", 1), ("a", 0)):
        learner.add_group(GroupInput(gid, batch.prompts[p], batch.groups[p], rewards[p]))
    stats = learner.finish()
    assert stats["num_minibatches"] == 1
    torch.testing.assert_close(_params(trainer.model), _params(ref_model), atol=2e-4, rtol=0)
    assert not torch.equal(_params(trainer.model), _params(base))

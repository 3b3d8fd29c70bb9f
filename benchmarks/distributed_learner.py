"""One GRPO update with 1 rank and with 2 gloo ranks on the CPU, from the same state.

The 1-rank learner is the plain one (StreamingLearner over PolicyTrainer and torch AdamW);
the 2-rank learner is what a learner instance with two ranks runs: this process is rank 0,
one follower is started by rlhfless.train.ranks.RankGroup, both run a
DistributedStreamingLearner over FSDP2-sharded policy and reference (gloo, fp32). The same
groups arrive in the same order; each rank takes a share of every group's responses; one
optimizer step at `finish`. Printed: `ranks=2 max |dw|: <x>` (largest absolute difference of
the weights after the step) and the step times (begin → finish, model already loaded): the
1-rank learner with 1 thread and with as many threads as the 2 ranks together, the 2 ranks
with 1 thread each. Also checked: a 2-rank learner rebuilt mid-step (what a restarted
instance does: same state, begin again, the same groups re-sent) produces bit-identical
weights. On 2 cores the 2 ranks are not expected to be faster: every block's parameters are
gathered and its gradients reduced over gloo, which is the point of sharding on GPUs
(memory), not speed on a tiny model.

    python benchmarks/distributed_learner.py [--prompts 4] [--group 8] [--tokens 48]
    python benchmarks/distributed_learner.py --cases      # small sizes, several algorithms

`--cases` runs GRPO (one mini-batch, with KL and entropy), GRPO with three mini-batches,
PPO (whitened GAE, critic) with two epochs, a group smaller than a mini-batch split that
leaves a rank a stand-in, and GRPO under gradient checkpointing with the gradient clipped;
each prints max |dw| and both gradient norms. tests/test_distributed_learner.py runs it.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhfless.api.spec import AlgorithmSpec, TinyModelSpec, TrainerSpec  # noqa: E402
from rlhfless.model.loading import load_tiny  # noqa: E402
from rlhfless.model.value import ValueModel  # noqa: E402
from rlhfless.train.distributed import (  # noqa: E402
    DistributedPolicyTrainer,
    DistributedStreamingLearner,
    Ranks,
    shard_frozen,
)
from rlhfless.train.ranks import RankGroup  # noqa: E402
from rlhfless.train.sharding import ShardedModule  # noqa: E402
from rlhfless.train.streaming import GroupInput, LearnerStateError, StreamingLearner  # noqa: E402
from rlhfless.train.update import PolicyTrainer, step_seed  # noqa: E402

FACTORY = "distributed_learner:TinyLearner"  # followers import this file by its name
STEP = 3


def groups(prompts: int, group: int, tokens: int, seed: int) -> list[dict[str, Any]]:
    """Random prompts and responses of mixed lengths (1..tokens), rewards in [0, 1)."""
    gen = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        return torch.randint(2, 128, (n,), generator=gen).tolist()

    return [{"group_id": f"g{p}", "prompt": ids(3, 12),
             "responses": [ids(1, tokens) for _ in range(group)],
             "rewards": [float(torch.rand(1, generator=gen)) for _ in range(group)]}
            for p in range(prompts)]


class TinyLearner:
    """A learner on a tiny random model, the same on every rank (`factory(config, ranks)`).

    config: tiny (TinyModelSpec fields), algo (AlgorithmSpec fields), trainer (TrainerSpec
    fields, optional), threads."""

    request_errors = (LearnerStateError, ValueError)

    def __init__(self, config: dict[str, Any], ranks: Ranks | None = None) -> None:
        self.ranks = ranks
        self.configure(config)

    def configure(self, config: dict[str, Any]) -> None:
        """(Re)build from the initial state: what a restarted instance does."""
        if config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
        algo = AlgorithmSpec(**config["algo"])
        spec = TrainerSpec(**config.get("trainer", {}))
        policy, _ = load_tiny(TinyModelSpec(**config["tiny"]))
        reference = copy.deepcopy(policy).eval() if algo.kl_beta > 0 else None
        critic = ValueModel(copy.deepcopy(policy)) if algo.name == "ppo" else None
        self.algo = algo
        if self.ranks is None:
            trainer = PolicyTrainer(policy, algo, spec, critic=critic)
            self.learner = StreamingLearner(trainer, algo, algo.group_size, reference)
        else:
            trainer = DistributedPolicyTrainer(policy, algo, spec, self.ranks, critic=critic)
            ref = shard_frozen(reference, self.ranks) if reference is not None else None
            self.learner = DistributedStreamingLearner(trainer, algo, algo.group_size, ref)

    def begin(self, step: int, group_ids: list[str]) -> None:
        self.learner.begin(step, group_ids, step_seed(0, step))

    def add(self, group: dict[str, Any]) -> bool:
        return self.learner.add_group(GroupInput(**group))

    def finish(self) -> dict[str, float]:
        return self.learner.finish()

    def weights(self) -> torch.Tensor:
        """Every trained parameter, flattened (gathered: collective on every rank)."""
        out = []
        for optimizer in (self.learner.trainer.policy_optimizer,
                          self.learner.trainer.critic_optimizer):
            if optimizer is None:
                continue
            sharded = getattr(optimizer, "sharded", None)
            state = sharded.full_state_dict() if isinstance(sharded, ShardedModule) \
                else {k: v.detach() for k, v in optimizer.module.state_dict().items()}
            out += [state[k].flatten() for k in sorted(state)]
        return torch.cat(out)


def one_step(call, data: list[dict[str, Any]], restart_after: int | None = None,
             rebuild=None) -> tuple[float, dict[str, float]]:
    """begin → add × groups → finish through `call(method, *args)`: (seconds, finish stats)."""
    ids = [g["group_id"] for g in data]
    started = time.perf_counter()
    call("begin", STEP, ids)
    for k, group in enumerate(data):
        if restart_after is not None and k == restart_after:
            rebuild()  # the learner is lost: a fresh one on the same state, the step again
            call("begin", STEP, ids)
            for earlier in data[:k]:
                call("add", earlier)
        call("add", group)
    stats = call("finish")
    return time.perf_counter() - started, stats


def measure(call, config: dict[str, Any],
            data: list[dict[str, Any]]) -> tuple[float, Any, dict[str, float]]:
    """A warm-up step, then the timed step from the initial state: (seconds, weights,
    stats)."""
    call("configure", config)
    one_step(call, data)
    call("configure", config)
    seconds, stats = one_step(call, data)
    return seconds, call("weights"), stats


def compare(group: RankGroup, config: dict[str, Any], data: list[dict[str, Any]],
            check_restart: bool, timed: bool = True) -> dict[str, Any]:
    """The same step on one rank (in this process) and on `group`'s ranks. `timed`: also time
    the one-rank learner with as many threads as the ranks together."""
    world = group.world
    single = TinyLearner({**config, "threads": 1})

    def local(method: str, *args: Any) -> Any:
        return getattr(single, method)(*args)

    start = single.weights()
    one_s, w1, stats1 = measure(local, {**config, "threads": 1}, data)
    out: dict[str, Any] = {"one_s": one_s}
    if timed:
        out["one_threads_s"] = measure(local, {**config, "threads": world}, data)[0]
    torch.set_num_threads(1)
    many_s, w2, stats2 = measure(group.call, {**config, "threads": 1}, data)
    norms = (stats1.get("grad_norm", 0.0), stats2.get("grad_norm", 0.0))
    out.update(many_s=many_s, max_dw=float((w1 - w2).abs().max()),
               moved=float((w1 - start).abs().max()), grad_norms=norms)
    if check_restart:
        group.call("configure", {**config, "threads": 1})
        one_step(group.call, data, restart_after=len(data) // 2,
                 rebuild=lambda: group.call("configure", {**config, "threads": 1}))
        out["restart_identical"] = bool(torch.equal(group.call("weights"), w2))
    return out


def start_group(world: int, config: dict[str, Any]) -> RankGroup:
    torch.set_num_threads(1)
    return RankGroup.start(world, FACTORY, {**config, "threads": 1},
                           on_failure=lambda reason: None, threads=1)


CASES = {
    "grpo-kl-entropy": {"kl_beta": 0.1, "entropy_coef": 0.01, "mini_batch_size": 12},
    "grpo-3-minibatches": {"kl_beta": 0.1, "mini_batch_size": 4},
    "ppo-2-epochs": {"name": "ppo", "kl_beta": 0.05, "mini_batch_size": 6, "ppo_epochs": 2},
    "grpo-stand-in": {"kl_beta": 0.1, "mini_batch_size": 5, "loss_agg": "seq-mean-token-sum"},
    # max_grad_norm far below the gradients' norm: the clipping is always on.
    "grpo-clipped-checkpointing": {"kl_beta": 0.1, "mini_batch_size": 6, "max_grad_norm": 1e-3,
                                   "trainer": {"grad_checkpointing": True}},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--cases", action="store_true", help="small sizes, several algorithms")
    args = parser.parse_args(argv)
    world = 2
    tiny = {"n_layer": args.layers, "n_embd": args.width, "n_head": 4, "n_positions": 128}
    if args.cases:
        tiny = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}
        data = groups(4, 3, 8, seed=1)
        configs = {name: {"tiny": tiny, "trainer": algo.get("trainer", {}),
                          "algo": {"group_size": 3, "lr": 1e-3, "critic_lr": 1e-3,
                                   **{k: v for k, v in algo.items() if k != "trainer"}}}
                   for name, algo in CASES.items()}
        group = start_group(world, next(iter(configs.values())))
        try:
            for name, config in configs.items():
                res = compare(group, config, data,
                              check_restart=name == "grpo-3-minibatches", timed=False)
                extra = f" restart bit-identical: {res['restart_identical']}" \
                    if "restart_identical" in res else ""
                one, many = res["grad_norms"]
                print(f"case={name} ranks={world} max |dw|: {res['max_dw']:.3e} moved: "
                      f"{res['moved']:.3e} grad_norm: {one:.6g} / {many:.6g}{extra}",
                      flush=True)
        finally:
            group.close()
        return 0
    data = groups(args.prompts, args.group, args.tokens, seed=0)
    config = {"tiny": tiny,
              "algo": {"group_size": args.group, "lr": args.lr, "kl_beta": 0.05,
                       "mini_batch_size": args.prompts * args.group}}
    group = start_group(world, config)
    try:
        res = compare(group, config, data, check_restart=True)
    finally:
        group.close()
    print(f"tiny GPT-2 {args.layers}x{args.width}, {args.prompts} prompts x G={args.group}, "
          f"responses 1..{args.tokens} tokens, GRPO klBeta 0.05, one optimizer step, "
          f"lr {args.lr:g}")
    print(f"1 rank: {res['one_s']:.3f} s (1 thread), {res['one_threads_s']:.3f} s ({world} "
          f"threads); {world} gloo ranks (1 thread each): {res['many_s']:.3f} s")
    print(f"ranks={world} max |dw|: {res['max_dw']:.3e}")
    print(f"weights moved by the step: max {res['moved']:.3e}; a learner rebuilt mid-step: "
          f"{'bit-identical' if res['restart_identical'] else 'DIFFERENT'}")
    return 0 if res["max_dw"] <= 1e-5 and res["restart_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())

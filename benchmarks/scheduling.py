"""Prompt-assignment benchmark on long-tailed synthetic length traces.

    python benchmarks/scheduling.py [--prompts 4096] [--group-size 8] [--actors 8] [--seed 0]

For each trace (lognormal, bimodal) and each time model (see rlhfless/scheduling/workmodel.py:
continuous batching as in vLLM and our transformers engine, with and without a batch cap, and
static batching — "max decode steps × tpot(batch size)") it prints the predicted makespan of
length-aware, round-robin and random assignment, a lower bound valid for *every* split
(`lower_bound`), the textbook bound max(Σ work / N, largest group) (`simple_lower_bound`), and
the decision time of length-aware assignment. Bound and makespans use one time model.

Then the same with lengths *predicted* by the EWMA predictor from two earlier epochs (each
epoch's group-mean length = the prompt's own length × lognormal noise) and scored on the
actual lengths, and the cost-aware actor-count table for one trace.

Profile: 7B model on one H100 (Profile() defaults: tpot(b) = 7.5 ms + 0.04 ms·b, prefill
20k tok/s, cold start 30 s, keep-alive 30 s). Traces: max_new_tokens 8192; lognormal median
400 tokens, σ = 1; bimodal 70% ≈ N(200, 60), 30% ≈ N(3000, 900). Prompts 50–300 tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np

from rlhfless.scheduling import (
    LengthPredictor,
    Profile,
    Workload,
    assign,
    choose_actor_count,
    lower_bound,
    makespan,
    prediction_error,
    simple_lower_bound,
)

MAX_NEW_TOKENS = 8192
GOAL_BOUND, GOAL_RR, GOAL_MS = 1.05, 1.3, 30.0


def traces(m: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    lognormal = rng.lognormal(np.log(400), 1.0, m)
    long = rng.random(m) < 0.3
    bimodal = np.where(long, rng.normal(3000, 900, m), rng.normal(200, 60, m))
    return {name: np.clip(x, 16, MAX_NEW_TOKENS).round()
            for name, x in (("lognormal", lognormal), ("bimodal", bimodal))}


def timed_ms(fn, repeats: int = 7) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def compare(lengths: np.ndarray, prompts: np.ndarray, g: int, n: int, p: Profile,
            seed: int) -> dict[str, float]:
    work = Workload.groups(lengths, g, prompts)
    row = {policy: makespan(work, assign(work, n, p, policy=policy, seed=seed), p)
           for policy in ("length-aware", "round-robin", "random")}
    row["bound"] = lower_bound(work, n, p)
    row["simple"] = simple_lower_bound(work, n, p)
    row["ms"] = timed_ms(lambda: assign(lengths, n, p, group_size=g, prompt_tokens=prompts))
    return row


def predicted_run(lengths: np.ndarray, prompts: np.ndarray, g: int, n: int, p: Profile,
                  rng: np.random.Generator, noise: float) -> dict[str, float]:
    """Assign on EWMA predictions from two noisy earlier epochs; score on actual lengths."""
    ids = [f"q{i}" for i in range(len(lengths))]
    predictor = LengthPredictor(alpha=0.5)

    def epoch() -> np.ndarray:
        x = lengths * rng.lognormal(0.0, noise, len(lengths))
        return np.clip(x, 1, MAX_NEW_TOKENS).round()

    for _ in range(2):
        predictor.update(ids, epoch())
    actual = epoch()
    decide_ms = timed_ms(lambda: assign(predictor.predict(ids), n, p, group_size=g,
                                        prompt_tokens=prompts))
    pred = predictor.predict(ids)
    truth = Workload.groups(actual, g, prompts)
    err = prediction_error(pred, actual)
    return {
        "mae": err["mae"], "spearman": err["spearman"],
        "length-aware": makespan(truth, assign(pred, n, p, group_size=g,
                                               prompt_tokens=prompts), p),
        "oracle": makespan(truth, assign(truth, n, p), p),
        "round-robin": makespan(truth, assign(truth, n, p, policy="round-robin"), p),
        "bound": lower_bound(truth, n, p),
        "ms": decide_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4096)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--actors", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.3],
                    help="σ of the per-epoch lognormal length noise for the predicted runs")
    args = ap.parse_args()
    m, g, n = args.prompts, args.group_size, args.actors
    rng = np.random.default_rng(args.seed)
    trace = traces(m, rng)
    prompts = rng.integers(50, 301, m).astype(float)
    base = Profile()
    models = {
        "continuous": base,
        "continuous, max_batch=1024": replace(base, max_batch=1024),
        "static (max steps × tpot(b))": replace(base, batching="static"),
    }

    print(f"{m} prompts × G={g}, N={n} actors; makespans in predicted seconds "
          f"(exact lengths)\n")
    head = (f"{'time model':30} {'trace':9} {'length-aware':>12} {'round-robin':>11} "
            f"{'random':>8} {'bound':>8} {'simple':>8} {'LA/bound':>8} {'LA/simple':>9} "
            f"{'RR/LA':>6} {'rand/LA':>7} {'ms':>6}")
    print(head)
    print("-" * len(head))
    for model, p in models.items():
        for name, lengths in trace.items():
            r = compare(lengths, prompts, g, n, p, args.seed)
            la = r["length-aware"]
            print(f"{model:30} {name:9} {la:12.1f} {r['round-robin']:11.1f} "
                  f"{r['random']:8.1f} {r['bound']:8.1f} {r['simple']:8.1f} "
                  f"{la / r['bound']:8.3f} {la / r['simple']:9.3f} "
                  f"{r['round-robin'] / la:6.2f} {r['random'] / la:7.2f} {r['ms']:6.1f}")
    print(f"\ngoals: LA/bound ≤ {GOAL_BOUND}, RR/LA ≥ {GOAL_RR}, decision ≤ {GOAL_MS:.0f} ms "
          "(median of 7; ms = assign() for all groups)\n")

    print("with EWMA predictions (α=0.5, two earlier epochs, per-epoch lognormal noise σ), "
          "scored on actual lengths, continuous model")
    head = (f"{'trace':9} {'σ':>4} {'MAE':>7} {'spearman':>8} {'LA(pred)':>9} "
            f"{'LA(oracle)':>10} {'round-robin':>11} {'bound':>8} {'LA(pred)/bound':>14} "
            f"{'RR/LA(pred)':>11} {'ms':>6}")
    print(head)
    print("-" * len(head))
    for name, lengths in trace.items():
        for sigma in args.noise:
            r = predicted_run(lengths, prompts, g, n, base, rng, sigma)
            print(f"{name:9} {sigma:4.2f} {r['mae']:7.1f} {r['spearman']:8.3f} "
                  f"{r['length-aware']:9.1f} {r['oracle']:10.1f} {r['round-robin']:11.1f} "
                  f"{r['bound']:8.1f} {r['length-aware'] / r['bound']:14.3f} "
                  f"{r['round-robin'] / r['length-aware']:11.2f} {r['ms']:6.1f}")
    print("(ms = predict() + assign() for all groups)")

    lengths = trace["lognormal"]
    print("\ncost-aware actor count, lognormal trace, N ∈ [1, 16], cold actors "
          "(T = step seconds, C = GPU-seconds)")
    tables = {}
    for lam in (0.0, 0.5, 1.0):
        started = time.perf_counter()
        d = choose_actor_count(lengths, g, base, lam, 16, prompts)
        tables[lam] = (d, (time.perf_counter() - started) * 1e3)
    d0 = tables[0.0][0]
    print(f"{'N':>3} {'T (s)':>8} {'C (GPU·s)':>10} " + " ".join(
        f"{'score λ=' + str(lam):>12}" for lam in tables))
    for i, row in enumerate(d0.table):
        scores = " ".join(f"{tables[lam][0].table[i].score:12.3f}" for lam in tables)
        print(f"{row.n:3d} {row.time_s:8.1f} {row.gpu_seconds:10.0f} {scores}")
    print("chosen: " + ", ".join(f"λ={lam}: N={d.n} ({ms:.0f} ms)"
                                 for lam, (d, ms) in tables.items()))


if __name__ == "__main__":
    main()

"""Naive vs shared-prefix scoring of one GRPO group on CPU.

    python benchmarks/prefix_logprobs.py [--model auto|smollm2|tiny] [--group 8]
        [--prompt-len 256] [--response-len 64] [--repeats 1] [--grad] [--threads 1]

Prints wall time of: naive (one forward of prompt+response per sample), batched (all G
samples padded into one forward, prompt repeated), and shared prefix (prompt once, KV cache
expanded over the group), with max |Δ log p| against naive and the prefill tokens saved.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from rlhfless.model import grouped_logprobs, load_base, sequence_logprobs
from rlhfless.model.batching import right_pad, token_logprobs
from rlhfless.model.loading import ModelLoadError

TEXT = (
    "A farmer has 17 sheep and buys 5 more each week. After some weeks he sells half of the "
    "flock at the market and keeps the rest for the winter, when lambs are born. "
)


def load(name: str):
    tiny = SimpleNamespace(
        vocab_size=128, n_layer=4, n_embd=256, n_head=4, n_positions=1024, seed=0
    )
    if name in ("auto", "smollm2"):
        try:
            spec = SimpleNamespace(source="gguf", path="smollm2", gguf_file=None, tiny=tiny)
            return "SmolLM2-135M (GGUF, fp32)", *load_base(spec)
        except ModelLoadError:
            if name == "smollm2":
                raise
    spec = SimpleNamespace(source="tiny", path=None, gguf_file=None, tiny=tiny)
    return "tiny GPT-2 4x256", *load_base(spec)


def batched_logprobs(model, prompt, responses):
    """All samples in one padded forward, prompt repeated per row (no cache reuse)."""
    seqs = [prompt + r for r in responses]
    ids, mask = right_pad(seqs, 0)
    logits = model(input_ids=ids, attention_mask=mask).logits
    p = len(prompt)
    return [
        token_logprobs(logits[i, p - 1 : p - 1 + len(r)], ids[i, p : p + len(r)])
        for i, r in enumerate(responses)
    ]


def run_once(fn, grad: bool):
    start = time.perf_counter()
    with torch.set_grad_enabled(grad):
        out = fn()
        if grad:
            flat = [t for g in out for t in g] if isinstance(out[0], list) else out
            torch.stack([t.sum() for t in flat]).sum().backward()
    return time.perf_counter() - start, out


def timed_round_robin(fns: dict, repeats: int, grad: bool) -> dict:
    """Median time per method; methods alternate so they see the same background load."""
    times: dict = {name: [] for name in fns}
    outs: dict = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            elapsed, outs[name] = run_once(fn, grad)
            times[name].append(elapsed)
    return {name: (statistics.median(times[name]), outs[name]) for name in fns}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="auto", choices=["auto", "smollm2", "tiny"])
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--response-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--grad", action="store_true", help="time forward + backward")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch default); 1 is stable "
        "on shared cores, where extra threads spin against other processes",
    )
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    label, model, tok = load(args.model)
    ids = tok.encode(tok.render_prompt(TEXT * 40))
    prompt = ids[: args.prompt_len]
    gen = torch.Generator().manual_seed(0)
    vocab = min(tok.vocab_size, model.config.vocab_size)
    responses = [
        torch.randint(2, vocab, (args.response_len,), generator=gen).tolist()
        for _ in range(args.group)
    ]
    prompts = [prompt] * args.group
    if args.grad:
        model.train()

    results = timed_round_robin(
        {
            "naive": lambda: sequence_logprobs(model, prompts, responses),
            "batched": lambda: batched_logprobs(model, prompt, responses),
            "shared": lambda: grouped_logprobs(model, [prompt], [responses]),
        },
        args.repeats,
        args.grad,
    )
    t_naive, naive = results["naive"]

    def delta(out) -> float:
        return max((a - b).abs().max().item() for a, b in zip(out, naive, strict=True))

    t_batch, batch = results["batched"]
    t_shared, shared = results["shared"]
    rows = [
        ("naive (1 fwd / sample)", t_naive, 0.0, 0),
        ("batched (padded, 1 fwd)", t_batch, delta(batch), 0),
        ("shared prefix", t_shared, delta(shared[0]), shared.prefill_tokens_saved),
    ]
    mode = "forward+backward" if args.grad else "forward (no grad)"
    print(
        f"model: {label}; G={args.group}, prompt {len(prompt)} tok, response "
        f"{args.response_len} tok; {mode}; torch threads {torch.get_num_threads()}; "
        f"median of {args.repeats}"
    )
    print(f"{'method':<26}{'time s':>9}{'speed-up':>10}{'max|Δlogp|':>13}{'prefill saved':>15}")
    for name, t, d, saved in rows:
        print(f"{name:<26}{t:>9.3f}{t_naive / t:>9.2f}x{d:>13.2e}{saved:>15}")


if __name__ == "__main__":
    main()

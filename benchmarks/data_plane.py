"""The data plane: JSON vs the binary codec for a rollout's token ids and log-probs.

The payload is what actors report and the learner receives: 16,384 samples × 2,048 tokens,
each a RolloutSample-shaped dict with int32 token ids and float32 log-probs. Both paths start
from numpy arrays and end with numpy arrays (what the learner computes on):

- JSON: arrays → lists → `json.dumps` → bytes → `json.loads` → arrays;
- codec: `rlhfless.api.codec.encode` (msgpack, raw little-endian arrays) → bytes → `decode`
  (zero-copy array views).

Prints encode + decode seconds and bytes for each, the speed ratio and the codec's size
against the raw array bytes. JSON needs a few GB of memory at the default size.

    python benchmarks/data_plane.py [--samples 16384] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np

from rlhfless.api import codec


def payload(samples: int, tokens: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 50_000, (samples, tokens), dtype=np.int32)
    logp = -rng.exponential(2.0, (samples, tokens)).astype(np.float32)
    return {"samples": [{"key": f"p{i // 8}", "index": i % 8, "response": ids[i],
                         "logprobs": logp[i], "finished": True} for i in range(samples)]}


def json_round_trip(message: dict) -> tuple[float, float, int, dict]:
    started = time.perf_counter()
    body = json.dumps({"samples": [{**s, "response": s["response"].tolist(),
                                    "logprobs": s["logprobs"].tolist()}
                                   for s in message["samples"]]}).encode()
    encoded = time.perf_counter()
    raw = json.loads(body)
    out = {"samples": [{**s, "response": np.asarray(s["response"], dtype=np.int32),
                        "logprobs": np.asarray(s["logprobs"], dtype=np.float32)}
                       for s in raw["samples"]]}
    decoded = time.perf_counter()
    return encoded - started, decoded - encoded, len(body), out


def codec_round_trip(message: dict) -> tuple[float, float, int, dict]:
    started = time.perf_counter()
    body = codec.encode(message)
    encoded = time.perf_counter()
    out = codec.decode(body)
    decoded = time.perf_counter()
    return encoded - started, decoded - encoded, len(body), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16_384)
    parser.add_argument("--tokens", type=int, default=2_048)
    args = parser.parse_args()
    message = payload(args.samples, args.tokens)
    raw = sum(s["response"].nbytes + s["logprobs"].nbytes for s in message["samples"])
    print(f"{args.samples:,} samples × {args.tokens:,} tokens (int32 ids + float32 "
          f"log-probs): {raw / 1e6:,.1f} MB of raw arrays")
    results = {}
    for name, fn in (("codec", codec_round_trip), ("json", json_round_trip)):
        enc, dec, size, out = fn(message)
        check = out["samples"][-1]
        assert np.array_equal(check["response"], message["samples"][-1]["response"])
        assert np.array_equal(check["logprobs"], message["samples"][-1]["logprobs"])
        del out
        gc.collect()
        results[name] = (enc, dec, size)
        print(f"{name:6s} encode {enc:7.2f} s  decode {dec:7.2f} s  total {enc + dec:7.2f} s  "
              f"{size / 1e6:10,.1f} MB  ({size / raw:.3f}× raw)")
    (je, jd, _), (ce, cd, cs) = results["json"], results["codec"]
    print(f"codec vs JSON: {(je + jd) / (ce + cd):.1f}× faster (encode + decode), "
          f"{cs / raw:.3f}× the raw array bytes")


if __name__ == "__main__":
    main()

"""Math-verify worker process: one {"gold", "pred"} JSON line in, one {"equal"} line out.

Run as a file (`python -I _mathverify_worker.py`), not as part of the package: it needs only
math-verify. Its own signal-based timeouts are off (they need a main thread and would fight
ours); the parent bounds each request by killing this process.
"""

import json
import logging
import resource
import sys

MEMORY_BYTES = 2 << 30  # a runaway simplification fails here instead of swapping the node


def main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    logging.disable(logging.WARNING)  # "timeout is disabled" notices: we bound it ourselves
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_targets = (LatexExtractionConfig(),)
    pred_targets = (ExprExtractionConfig(), LatexExtractionConfig())
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            gold = parse(request["gold"], gold_targets, parsing_timeout=None)
            pred = parse(request["pred"], pred_targets, parsing_timeout=None)
            equal = bool(gold and pred and verify(gold, pred, timeout_seconds=None))
        except Exception:  # noqa: BLE001 - any failure to compare is "not equal"
            equal = False
        out.write(json.dumps({"equal": equal}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()

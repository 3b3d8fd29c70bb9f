"""Prometheus metrics exported by every stage function on `/metrics`.

Labels: `stage` and a request's `outcome` (one of OUTCOMES), nothing per request. Every
counter starts at 0 when the instance starts, so a rate sees its first request too (a
series first scraped at 1 is not an increase to Prometheus).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

METRIC_NAMES = (
    "rlhfless_function_requests_total",
    "rlhfless_function_request_seconds",
    "rlhfless_function_busy",
    "rlhfless_function_weights_version",
    "rlhfless_function_cold_start_seconds",
    "rlhfless_function_tokens_total",
    "rlhfless_function_prefill_tokens_saved_total",
)

# How a request ended: served, answered from the retry cache, rejected as malformed (4xx),
# refused by the function (its own 4xx), or failed inside it (5xx).
OUTCOMES = ("ok", "cached", "invalid", "refused", "error")


class FunctionMetrics:
    """One registry per process so tests can build several apps side by side."""

    def __init__(self, stage: str):
        self.registry = CollectorRegistry()
        self.stage = stage
        self.requests = Counter(
            "rlhfless_function_requests", "Requests served, by outcome.",
            ["stage", "outcome"], registry=self.registry,
        )
        self.seconds = Histogram(
            "rlhfless_function_request_seconds", "Time inside the function per request.",
            ["stage"], registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        self.busy = Gauge(
            "rlhfless_function_busy", "1 while a request is being served.", ["stage"],
            registry=self.registry,
        )
        self.version = Gauge(
            "rlhfless_function_weights_version", "Weights version loaded.", ["stage"],
            registry=self.registry,
        )
        self.cold_start = Gauge(
            "rlhfless_function_cold_start_seconds", "Process start to ready.", ["stage"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "rlhfless_function_tokens", "Tokens generated or scored.", ["stage"],
            registry=self.registry,
        )
        self.prefill_saved = Counter(
            "rlhfless_function_prefill_tokens_saved",
            "Prompt tokens not recomputed thanks to shared-prefix reuse.", ["stage"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.requests.labels(stage, outcome)
        for metric in (self.seconds, self.busy, self.tokens, self.prefill_saved):
            metric.labels(stage)

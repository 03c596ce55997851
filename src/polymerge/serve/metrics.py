"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own.

Requests and errors by endpoint, model and status; rows answered by endpoint and expert;
latency per endpoint; rows per batch by kind; model passes by path; queue depth; requests in
flight; generated and prompt tokens, and the tokens per second of the last generate batch;
the process's resident memory and CPU time (``process_*``).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # no *_created series: they double the output and say little

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The counters, gauges and histograms (see the module docstring)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.requests = Counter("polymerge_requests", "Requests answered, by endpoint, model "
                                "and HTTP status", ["endpoint", "model", "status"], registry=r)
        self.errors = Counter("polymerge_request_errors", "Requests refused or failed, by "
                              "endpoint and error code", ["endpoint", "code"], registry=r)
        self.rows = Counter("polymerge_rows", "Prompts or inputs answered, by endpoint and the "
                            "expert that served them", ["endpoint", "expert"], registry=r)
        self.latency = Histogram("polymerge_request_seconds", "Request latency, arrival to last "
                                 "byte", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("polymerge_batch_rows", "Rows per batch run by the model",
                                    ["kind"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("polymerge_batch_seconds", "Time per batch",
                                       ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.paths = Counter("polymerge_model_passes", "Model passes (forward or generate "
                             "calls) by path: switch or gather (switching stores), mix, plain",
                             ["path"], registry=r)
        self.queue = Gauge("polymerge_queue_rows", "Rows waiting for a batch", registry=r)
        self.in_flight = Gauge("polymerge_requests_in_flight", "Requests being answered",
                               registry=r)
        self.tokens = Counter("polymerge_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("polymerge_prompt_tokens", "Prompt tokens read",
                                     registry=r)
        self.tokens_per_second = Gauge("polymerge_tokens_per_second", "Tokens per second of "
                                       "the last generate batch", registry=r)

    def batch(self, kind: str, rows: int, seconds: float) -> None:
        self.batch_rows.labels(kind).observe(rows)
        self.batch_seconds.labels(kind).observe(seconds)

    def generated(self, tokens: int, seconds: float) -> None:
        self.tokens.inc(tokens)
        if seconds > 0:
            self.tokens_per_second.set(tokens / seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

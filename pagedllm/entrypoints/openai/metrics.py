"""Prometheus metrics of one server app, with vLLM's names under a ``pagedllm:`` prefix.

Each app has its own CollectorRegistry, so several apps can live in one process (tests).
Load gauges are read from the engine's stats snapshot at scrape time; per-request
counters and latency histograms are fed by a RequestTracker as outputs arrive.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagedllm.core.async_engine import AsyncLLMEngine
from pagedllm.core.outputs import RequestOutput

_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0]
_E2E_BUCKETS = [0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0, 1920.0, 7680.0]


class _EngineStatsCollector(Collector):
    """Gauges and engine-side counters from ``AsyncLLMEngine.stats()`` at scrape time."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        values = [
            (GaugeMetricFamily, "num_requests_running", "Requests (samples) in the running batch.", stats.num_running),
            (GaugeMetricFamily, "num_requests_waiting", "Requests (samples) waiting to be scheduled.", stats.num_waiting),
            (GaugeMetricFamily, "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).",
             stats.kv_cache_usage),
            (GaugeMetricFamily, "num_kv_blocks", "KV-cache blocks in the pool.", stats.num_kv_blocks),
            (CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             stats.prefix_cache_queries),
            (CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             stats.prefix_cache_hits),
            (CounterMetricFamily, "num_preemptions", "Preemptions (requests sent back to recompute).",
             stats.num_preemptions),
        ]
        for family, name, documentation, value in values:
            metric = family(f"pagedllm:{name}", documentation, labels=["model_name"])
            metric.add_metric([self.model_name], value)
            yield metric


class ServerMetrics:
    """The app's registry and the request-level metrics."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(engine, model_name))
        labels = {"labelnames": ["model_name"], "registry": self.registry}

        def counter(name: str, documentation: str) -> Counter:
            return Counter(f"pagedllm:{name}", documentation, **labels).labels(model_name)

        def histogram(name: str, documentation: str, buckets: list[float]) -> Histogram:
            return Histogram(f"pagedllm:{name}", documentation, buckets=buckets, **labels).labels(model_name)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first generated token.",
                              _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive generated tokens.", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token.", _E2E_BUCKETS)
        self._success = Counter("pagedllm:request_success", "Finished requests, by finish reason.",
                                labelnames=["model_name", "finished_reason"], registry=self.registry)
        self._model_name = model_name

    def request_success(self, finish_reason: str) -> None:
        self._success.labels(self._model_name, finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Feeds one engine request's outputs (all its ``n`` samples) into the metrics."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.num_tokens: dict[int, int] = {}  # sample index -> tokens seen
        self.last_token_time: float | None = None

    def observe(self, output: RequestOutput, produced: float) -> None:
        """Count one output, produced by the engine at ``produced`` (``time.monotonic()``)."""
        m = self.metrics
        new = {c.index: len(c.token_ids) - self.num_tokens.get(c.index, 0) for c in output.outputs}
        num_new = sum(new.values())
        if num_new > 0:
            if self.last_token_time is None:
                m.prompt_tokens.inc(len(output.prompt_token_ids))
                metrics = output.metrics
                if metrics is not None and metrics.first_token_time is not None:
                    m.ttft.observe(metrics.first_token_time - metrics.arrival_time)
            else:
                # Samples advance together: a step that brought k tokens to a sample is k intervals.
                steps = max(new.values())
                for _ in range(steps):
                    m.itl.observe((produced - self.last_token_time) / steps)
            m.generation_tokens.inc(num_new)
            self.last_token_time = produced
            self.num_tokens.update({c.index: len(c.token_ids) for c in output.outputs})
        if output.finished:
            metrics = output.metrics
            if metrics is not None and metrics.finished_time is not None:
                m.e2e.observe(metrics.finished_time - metrics.arrival_time)
            for completion in output.outputs:
                m.request_success(completion.finish_reason or "unknown")

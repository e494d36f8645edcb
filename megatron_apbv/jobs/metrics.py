"""Prometheus metrics of ``apbv infer`` (``--metrics-port`` / ``jobs.metrics_port``), served by rank 0.

The numbers of the whole job live in the job's torch.distributed store, next to the work
queue's counters (:mod:`.scheduler`): every replica's leader adds what it answered there, so
rank 0 reports all replicas, not only its own. With metrics on, a leader also adds each
record's stage seconds to the bucket of a fixed histogram per stage (one ``store.add`` per
stage for the bucket and one for the sum, in microseconds: integers, atomic on the store).

Rank 0 serves them in the Prometheus text format with ``prometheus-client``, from its own
registry (no process-global one) through a custom collector that reads the store at each
scrape: counters ``apbv_requests_total``, ``apbv_request_errors_total``,
``apbv_generated_tokens_total``, a gauge ``apbv_requests_pending`` and one histogram
``apbv_stage_seconds{stage=...}`` of the seconds each answered request spent in each stage.
"""

from __future__ import annotations

import bisect
from typing import Optional

from megatron_apbv.inference.engine import STAGES

BUCKETS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)  # seconds; +Inf after
_PREFIX = "apbv/infer/stage"


def _bucket_key(stage: str, index: int) -> str:
    return f"{_PREFIX}/{stage}/bucket/{index}"


def _sum_key(stage: str) -> str:
    return f"{_PREFIX}/{stage}/sum_us"


def observe_stages(store, seconds: dict) -> None:
    """Leader: add one answered request's stage seconds to the job's histograms."""
    for stage in STAGES:
        value = float(seconds.get(stage, 0.0))
        store.add(_bucket_key(stage, bisect.bisect_left(BUCKETS, value)), 1)
        store.add(_sum_key(stage), int(round(value * 1e6)))


def reset_stage_histograms(store) -> None:
    """Zero the histograms: for several jobs in one launch (the Python API, a benchmark)."""
    for stage in STAGES:
        store.delete_key(_sum_key(stage))
        for index in range(len(BUCKETS) + 1):
            store.delete_key(_bucket_key(stage, index))


class JobCollector:
    """A prometheus-client collector reading the job's counters (a :class:`~.scheduler.WorkQueue`) at each scrape."""

    def __init__(self, queue, total: int):
        self.queue, self.total = queue, total

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        answered, errors = self.queue.counts()
        yield CounterMetricFamily("apbv_requests", "requests answered (error records not counted)", value=answered)
        yield CounterMetricFamily("apbv_request_errors", "requests answered with an error record", value=errors)
        yield CounterMetricFamily("apbv_generated_tokens", "tokens generated", value=self.queue.generated_tokens())
        yield GaugeMetricFamily("apbv_requests_pending", "requests of this job not answered yet",
                                value=self.total - answered - errors)
        histogram = HistogramMetricFamily("apbv_stage_seconds", "seconds an answered request spent in a stage",
                                          labels=["stage"])
        store = self.queue.store
        for stage in STAGES:
            counts = [store.add(_bucket_key(stage, i), 0) for i in range(len(BUCKETS) + 1)]
            cumulative, running = [], 0
            for bound, count in zip([*map(str, BUCKETS), "+Inf"], counts):
                running += count
                cumulative.append((bound, running))
            histogram.add_metric([stage], cumulative, sum_value=store.add(_sum_key(stage), 0) / 1e6)
        yield histogram


class MetricsServer:
    """Rank 0's HTTP endpoint (``port`` 0: any free port, see :attr:`port`); :meth:`close` stops it."""

    def __init__(self, queue, total: int, port: int, addr: str = "0.0.0.0"):
        from prometheus_client import CollectorRegistry, start_http_server

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(JobCollector(queue, total))
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port = self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def metrics_port(option: Optional[int], jobs_port: Optional[int]) -> Optional[int]:
    """``--metrics-port`` wins over ``jobs.metrics_port``; None: no metrics."""
    return option if option is not None else jobs_port

"""Rank 0's view of a running ``apbv infer`` job: the progress display and the metrics endpoint.

Both read the job's counters from the store (:mod:`.scheduler`), which every replica's leader
updates, so they show all replicas; neither waits for rank 0's own replica, which may be in the
middle of a long request. A daemon thread polls the counters (every second on a terminal,
every ``jobs.progress_seconds`` in a log); the metrics endpoint (:mod:`.metrics`) reads them
at each scrape. (A TCPStore client serialises its operations under one lock, so these threads
and the main one share the job's store safely.)
"""

from __future__ import annotations

import threading
from typing import Optional

from megatron_apbv.runtime.progress import Progress


class JobMonitor:
    """Progress (unless ``quiet``) and, with ``port`` not None, a Prometheus endpoint, until :meth:`close`."""

    def __init__(self, queue, total: int, *, quiet: bool, interval: float, port: Optional[int], stream=None):
        self.queue = queue
        self.progress = Progress(total, "apbv infer", enabled=not quiet, stream=stream, interval=interval)
        self.server = None
        if port is not None:
            from megatron_apbv.jobs.metrics import MetricsServer

            self.server = MetricsServer(queue, total, port)
            print(f"apbv infer: Prometheus metrics on port {self.server.port} (rank 0)",
                  file=self.progress.stream, flush=True)
        self._stop = threading.Event()
        self._thread = None
        if self.progress.enabled:
            poll = 1.0 if self.progress.terminal else interval
            self._thread = threading.Thread(target=self._run, args=(poll,), name="apbv-progress", daemon=True)
            self._thread.start()

    def _counts(self) -> tuple[int, int, int]:
        answered, errors = self.queue.counts()
        return answered + errors, errors, self.queue.generated_tokens()

    def _run(self, poll: float) -> None:
        while not self._stop.wait(poll):
            self.progress.update(*self._counts())

    def close(self) -> None:
        """The last line (or the finished bar); the endpoint stops."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.progress.update(*self._counts())
        self.progress.close()
        if self.server is not None:
            self.server.close()

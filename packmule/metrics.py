"""Prometheus metrics of one worker process, served by ``packmule worker --metrics-port``.

Each worker process serves its own ``/metrics`` (with ``--concurrency N``,
child ``i`` on port ``P + i``): no files shared between processes, and a
restarted child starts its counters afresh, which Prometheus reads as a
counter reset (``rate()`` and ``increase()`` allow for it). Series:

- ``packmule_jobs_total{runner, method, outcome}``: jobs handled, by how
  they ended (``done``, ``handled``, ``retried``, ``failed``, ``cancelled``,
  ``parked``, ``unrunnable``, ``corrupt``);
- ``packmule_job_duration_seconds{runner, method}``: time handling a job;
- ``packmule_job_retries_total`` and ``packmule_job_burials_total`` ``{runner, method}``;
- ``packmule_job_wait_seconds{runner}``: from enqueue to the start of an
  attempt (a retry's includes its backoff; aggregates, which wait parked
  for their dependencies, are not counted);
- the process's own (CPU, memory, open files: ``process_*``).

An update costs a dictionary lookup and a locked add, a few microseconds.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client import start_http_server as _start_http_server

from packmule.envelope import Envelope

_DURATIONS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800)
_WAITS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600)


class WorkerMetrics:
    """The metrics of this worker process, on a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        labels = ["runner", "method"]
        self._jobs = Counter("packmule_jobs", "Jobs handled by this worker, by outcome.",
                             [*labels, "outcome"], registry=self.registry)
        self._duration = Histogram("packmule_job_duration_seconds", "Time handling a job.",
                                   labels, buckets=_DURATIONS, registry=self.registry)
        self._retries = Counter("packmule_job_retries", "Jobs released for a retry.", labels,
                                registry=self.registry)
        self._burials = Counter("packmule_job_burials", "Jobs failed for good and buried.",
                                labels, registry=self.registry)
        self._wait = Histogram("packmule_job_wait_seconds",
                               "From enqueue to the start of an attempt.", ["runner"],
                               buckets=_WAITS, registry=self.registry)
        self._children: dict[tuple[str, ...], tuple[Counter, Histogram]] = {}

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread."""
        _start_http_server(port, addr=host, registry=self.registry)

    def started(self, envelope: Envelope) -> None:
        """A job's attempt starts: how long it waited since its enqueue."""
        if envelope.enqueued and not envelope.aggregate:
            self._wait.labels(envelope.runner).observe(max(0.0, time.time() - envelope.enqueued))

    def ended(self, runner: str, method: str, outcome: str, seconds: float) -> None:
        """A job was handled, ending with ``outcome`` after ``seconds``."""
        key = (runner, method, outcome)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self._jobs.labels(*key),
                                              self._duration.labels(runner, method))
        children[0].inc()
        children[1].observe(seconds)
        if outcome == "retried":
            self._retries.labels(runner, method).inc()
        elif outcome == "failed":
            self._burials.labels(runner, method).inc()

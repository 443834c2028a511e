"""Runners the benchmarks run; workers import this module (``--import bench_runners``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from packmule import Runner


class Fanout(Runner):
    """N no-op jobs fanned out with one ``enqueue_each``; one aggregate over their values.

    Each job returns the time it returned; the aggregate's first line notes
    when it was called with every value read, so run.py can tell the
    fan-out, the work and the fan-in apart (``marks``), like the floor.
    """

    # perf_counter() when run() began, when the fan-out returned and when the
    # aggregate was called, and time.time() minus the last job's return then:
    # read by run.py in the caller (where run() and the aggregate execute).
    marks: list[float]
    fanin: float

    def run(self, count: int = 1000) -> Any:
        self.marks = [time.perf_counter()]
        jobs = self.fan_out(count)
        self.marks.append(time.perf_counter())
        return self.deferred_result("lag", jobs)

    def fan_out(self, count: int) -> list[Any]:
        return self.enqueue_each("stamp", range(count))

    def stamp(self, _index: int) -> float:
        return time.time()

    def lag(self, finished: list[float]) -> float:
        now = time.time()
        if hasattr(self, "marks"):
            self.marks.append(time.perf_counter())
        return now - max(finished)


class Loop(Fanout):
    """The same, fanned out the way the README teaches: a loop of single ``enqueue`` calls."""

    def fan_out(self, count: int) -> list[Any]:
        return [self.enqueue("stamp", index) for index in range(count)]


class FanInClock(Fanout):
    """Fan-in latency alone: through ``run()`` the aggregate runs in the caller (woken
    through etcd); through ``run_async()`` the run and its aggregate run on workers
    (the aggregate parked, then kicked). Its value is the fan-in, in seconds."""


class FanInTrace(FanInClock):
    """Like FanInClock, but the aggregate returns ``[called at, last job finished at]``."""

    def lag(self, finished: list[float]) -> Any:
        return [time.time(), max(finished)]


class LoopTrace(FanInTrace):
    """FanInTrace fanned out by a loop of ``enqueue``."""

    def fan_out(self, count: int) -> list[Any]:
        return [self.enqueue("stamp", index) for index in range(count)]


class Driven(Runner):
    """Calls the benchmark's function inside its run, where enqueue works (no workers)."""

    def run(self, call: Callable[[Runner], Any]) -> Any:  # type: ignore[override]
        return call(self)

    def stamp(self, _index: int) -> float:
        return time.time()


class Holding(Driven):
    """Enqueues jobs nobody runs, then holds its run open until told: progress to read."""

    def run(self, count: int, release: threading.Event) -> Any:  # type: ignore[override]
        self.enqueue_each("stamp", range(count))
        self.ready.set()
        release.wait(600)

    ready: threading.Event

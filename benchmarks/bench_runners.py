"""Runners the benchmarks run; workers import this module (``--import bench_runners``)."""

from __future__ import annotations

import time
from typing import Any

from packmule import Runner


class Fanout(Runner):
    """N no-op jobs, each returning its input; one aggregate sums them."""

    # perf_counter() when run() began, when enqueue_each returned and when the aggregate
    # was called; read by run.py in the caller (where run() and the aggregate execute).
    marks: list[float]

    def run(self, count: int = 1000) -> Any:
        self.marks = [time.perf_counter()]
        jobs = self.enqueue_each("echo", range(count))
        self.marks.append(time.perf_counter())
        return self.deferred_result("total", jobs)

    def echo(self, value: int) -> int:
        return value

    def total(self, values: list[int]) -> int:
        if hasattr(self, "marks"):
            self.marks.append(time.perf_counter())
        return sum(values)


class FanInClock(Runner):
    """Each job returns the time it finished; the aggregate returns how long ago the last did.

    Called through ``run()``, the aggregate runs in the caller (woken through etcd);
    through ``run_async()``, the run and its aggregate run on workers (parked, kicked).
    """

    def run(self, count: int = 100) -> Any:
        jobs = self.enqueue_each("stamp", range(count))
        return self.deferred_result("lag", jobs)

    def stamp(self, _index: int) -> float:
        return time.time()

    def lag(self, finished: list[float]) -> float:
        return time.time() - max(finished)


class FanInTrace(FanInClock):
    """Like FanInClock, but the aggregate returns ``[called at, last job finished at]``."""

    def lag(self, finished: list[float]) -> Any:
        return [time.time(), max(finished)]


class Driven(Fanout):
    """Calls the benchmark's function inside its ``run()``, where enqueue works.

    packmule refuses an enqueue outside a run; the enqueue and progress
    benchmarks put jobs on a tube no worker watches, from inside a run that
    stays open while they measure.
    """

    def run(self, call: Any) -> Any:  # type: ignore[override]
        return call(self)

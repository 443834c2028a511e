"""Runners used by the tests; workers import this module by name."""

from __future__ import annotations

import os
import time
from typing import Any

from packmule import Runner


def wait_until(condition: Any, timeout: float = 30.0) -> None:
    """Poll ``condition`` until true (test helper; fails after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


class Adder(Runner):
    """Fan out ``count`` jobs returning their input, sum them."""

    def run(self, count: int = 10, pause: float = 0.0) -> Any:
        jobs = self.enqueue_each("echo", [(i, pause) for i in range(count)])
        return self.deferred_result("total", jobs)

    def echo(self, pair: list[Any]) -> int:
        time.sleep(pair[1])
        return int(pair[0])

    def total(self, values: list[int]) -> int:
        counter = os.environ.get("PACKMULE_TEST_COUNT_FILE")
        if counter:
            with open(counter, "a") as out:
                out.write("fired\n")
        return sum(values)


class Empty(Runner):
    """A run without jobs, and an aggregate over none."""

    def run(self) -> Any:
        return self.deferred_result("count", [])

    def count(self, values: list[Any]) -> int:
        return len(values)


class Slow(Runner):
    """Jobs that sleep, for tests that act on a run in the middle."""

    def run(self, count: int = 20, pause: float = 0.2) -> Any:
        jobs = self.enqueue_each("nap", [pause] * count)
        return self.deferred_result("total", jobs)

    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def total(self, values: list[float]) -> float:
        return round(sum(values), 6)


class LateRegistration(Adder):
    """Waits until every job finished before registering its aggregate."""

    before_register: Any = None  # a test's callable, run once the jobs are done

    def run(self, count: int = 10, pause: float = 0.0) -> Any:
        jobs = self.enqueue_each("echo", [(i, 0) for i in range(count)])
        wait_until(lambda: self.update_progress().completed == count)
        if self.before_register:
            self.before_register(jobs)
        return self.deferred_result("total", jobs)


class Collector(LateRegistration):
    """Returns the values it received, so tests can see MISSING in place."""

    def total(self, values: list[Any]) -> Any:
        return values


class Driven(Adder):
    """Calls a test's function inside its run, where enqueue and deferred_result work."""

    def run(self, call: Any) -> Any:  # type: ignore[override]
        return call(self)


class Marks(Runner):
    """Jobs that each note on ``self`` what they saw of the jobs before them.

    A worker makes a job's runner from what it keeps per job head (see
    packmule.execution.Kind): no job may see another's attributes.
    """

    def run(self, count: int = 30) -> Any:
        jobs = self.enqueue_each("mark", range(count))
        return self.deferred_result("seen", jobs)

    def mark(self, index: int) -> list[Any]:
        seen = [getattr(self, "marked", None), sorted(self.options)]
        self.marked = index
        self.options["job"] = index  # the options too: each job's own copy
        return seen

    def seen(self, values: list[Any]) -> list[Any]:
        return values


class Constructed(Marks):
    """The same, with an ``__init__`` of its own, which every job's runner goes through."""

    def __init__(self, name: str = "default", **options: Any) -> None:
        super().__init__(name, **options)
        self.built = os.getpid()

    def mark(self, index: int) -> list[Any]:
        assert self.built == os.getpid()
        return super().mark(index)


class Batched(Runner):
    """Quick jobs around one that takes its time: a worker asks for quick jobs in batches.

    ``slow`` notes when it starts and ends in files named by its arguments; a
    ``quick`` job given ``bad`` returns a value JSON cannot carry.
    """

    max_retries = 0

    def run(self, before: int, after: int, flags: str = "", seconds: float = 0.0,
            bad: int = -1) -> Any:
        jobs = self.enqueue_each("quick", range(before), bad)
        if flags:
            jobs.append(self.enqueue("slow", flags, seconds))
        jobs += self.enqueue_each("quick", range(before, before + after), bad)
        return self.deferred_result("count", jobs)

    def quick(self, index: int, bad: int) -> Any:
        return {index} if index == bad else index

    def slow(self, flags: str, seconds: float) -> int:
        with open(flags + ".started", "w"):
            pass
        time.sleep(seconds)
        with open(flags + ".ended", "w"):
            pass
        return -1

    def count(self, values: list[Any]) -> int:
        return len(values)


class Stalling(Runner):
    """Quick jobs, one of which stalls on its first run (it notes that in ``flags``.started)."""

    def run(self, count: int, stall_at: int, flags: str) -> Any:
        return self.deferred_result("count", self.enqueue_each("step", range(count), stall_at,
                                                               flags))

    def step(self, index: int, stall_at: int, flags: str) -> int:
        if index == stall_at and not os.path.exists(flags + ".started"):
            with open(flags + ".started", "w"):
                pass
            time.sleep(60)
        return index

    def count(self, values: list[int]) -> int:
        return len(set(values))

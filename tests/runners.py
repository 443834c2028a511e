"""Runners used by the tests; workers import this module by name."""

from __future__ import annotations

import os
import time
from typing import Any

from packmule import Runner


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

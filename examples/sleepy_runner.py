"""Pack Mule's README example: many snoozes in parallel, one wake-up sums them.

    packmule worker --import sleepy_runner      # with examples/ on PYTHONPATH
    python examples/sleepy_runner.py 100        # blocks, prints the sum
"""

from __future__ import annotations

import random
import sys
import time

from packmule import Runner


class SleepyRunner(Runner):
    """Snoozes ``nap_count`` times at random lengths, then adds the lengths up."""

    record_return_values = True

    def run(self, nap_count: int = 100, longest: float = 0.05) -> float:
        naps = [round(random.uniform(0, longest), 4) for _ in range(nap_count)]
        jobs = self.enqueue_each("snooze", naps)
        return self.deferred_result("wakeup", jobs)  # type: ignore[no-any-return]

    def snooze(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def wakeup(self, durations: list[float]) -> float:
        return round(sum(durations), 4)


if __name__ == "__main__":
    print(SleepyRunner("example").run(int(sys.argv[1]) if len(sys.argv) > 1 else 100))

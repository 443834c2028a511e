"""How many jobs a worker asks for at once: one, or a few when its jobs are quick.

A job of a millisecond or less costs the worker, beanstalkd and memcached
more in waking each other than in its own work. Asked for several at a
time (a batch), quick jobs cost one wake-up of each per batch: their
deletes go in one write, their values in another (see packmule.worker).

A batch holds jobs back from other workers, and values back from memcached,
while its jobs run: it is sized so its jobs take about ``HORIZON`` seconds,
by the worker's recent jobs. One slow job brings the worker back to one job
at a time at once. Within a batch, a job whose method has not shown itself
quick is run only once the values before it are recorded; if a job of a
batch turns out slow all the same, the keep-alive hands the jobs not started
yet back to the tube at its first tick, and keeps those run before it alive
(their values wait for it).
"""

from __future__ import annotations


class Pace:
    """The running estimate of one worker's job time, and the batch it allows."""

    HORIZON = 0.002  # seconds of work a batch may hold

    def __init__(self, most: int = 16) -> None:
        self.most = most  # jobs in a batch at most (settings' batch_jobs): more saves little
        self.seconds = self.HORIZON  # a new worker asks for one job at a time
        self._methods: dict[tuple[str, str], float] = {}  # the same, per (runner, method)

    def ran(self, method: tuple[str, str], seconds: float) -> None:
        """A job of ``method`` took ``seconds``: slow ones count at once, quick ones gradually.

        (The estimate, inline: this runs once per job.)
        """
        self.seconds = max(seconds, 0.8 * self.seconds + 0.2 * seconds)
        known = self._methods.get(method)
        if known is None and len(self._methods) >= 10_000:
            self._methods.clear()
        self._methods[method] = seconds if known is None else max(seconds,
                                                                  0.8 * known + 0.2 * seconds)

    def quick(self, method: tuple[str, str]) -> bool:
        """Whether jobs of ``method`` have been quick: such a job runs before the values of
        the jobs of its batch run before it are recorded (else they are recorded first)."""
        return self._methods.get(method, self.HORIZON + 1) <= self.HORIZON

    def batch(self) -> int:
        """How many jobs to ask for next."""
        return max(1, min(self.most, int(self.HORIZON / max(self.seconds, 1e-6))))

"""The runner of the torture test; workers import this module by name.

One runner class, :class:`Torture`, interprets a JSON spec given to ``run()``
or ``run_async()`` (``test_torture.model`` computes the value each spec must
end with, independently of this module). Every job receives the spec, so a
job knows its run's shape without any shared state. Shapes:

- ``fanout``: ``enqueue_each`` of ``n`` leaves, an aggregate sums them.
- ``tolerant``: the same with ``allow_failures``; the leaves in ``fail``
  always raise; the aggregate returns ``[failed slot indices, sum of others]``.
- ``diverge``: the leaves in ``diverge`` fan out differently on their retry
  (see :meth:`Torture.leaf`).
- ``fib``: each job enqueues two children and defers their sum.
- ``chain``: each step returns the JobRef of the next step, down to 0.

Faults the spec asks for, each once per run, remembered by marker files
under ``spec["dir"]`` (created with ``O_EXCL``, so once across processes):

- ``broken``: labels that raise while ``<dir>/fix-<run name>`` is absent.
- ``die``: labels whose first execution kills its own worker with SIGKILL,
  a forced redelivery after the time-to-run. Only in a worker (the variable
  ``PACKMULE_TORTURE_WORKER`` is set): a caller-side aggregate never kills the test.

Each aggregate call appends ``<run name> <label>`` to ``<dir>/calls``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from packmule import Failure, Runner


def _once(path: Path) -> bool:
    """Create ``path``; True only for the one caller, in any process, that created it."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def leaf_value(i: int, spec: dict[str, Any]) -> int:
    """What leaf ``i`` returns (the test's model has its own copy of this formula)."""
    return (i * spec["mul"] + spec["add"]) % 1009


class Torture(Runner):
    """Interprets a torture spec; see the module docstring.

    A 2 s time-to-run (the least allowed): a job whose worker died is handed
    out again quickly. ``max_retries`` and ``tube`` come from the constructor.
    """

    time_to_run = 2

    def run(self, spec: dict[str, Any]) -> Any:
        shape = spec["shape"]
        if shape == "chain":
            return self.enqueue("step", spec["depth"], spec)
        if shape == "fib":
            n = spec["n"]
            children = [self.enqueue("fib", n - 1, "0", spec), self.enqueue("fib", n - 2, "1", spec)]
            return self.deferred_result("add", children, "", spec)
        jobs = self.enqueue_each("leaf", range(spec["n"]), spec)
        return self.deferred_result("total", jobs, spec, allow_failures=shape == "tolerant")

    # Fan-outs -----------------------------------------------------------------------------
    def leaf(self, i: int, spec: dict[str, Any]) -> Any:
        """Leaf ``i``: its value, or a failure, or (diverging) a deferred pair.

        A diverging leaf's first attempt enqueues one job, defers an aggregate
        over it and raises; its retry enqueues that job and another and returns
        the deferred sum of both. The run must carry the retry's value, never
        the first attempt's (``first_attempt`` adds a million to be seen).
        """
        self._faults(spec, f"leaf{i}")
        if spec.get("pause"):
            time.sleep(spec["pause"])
        if i in spec.get("fail", []):
            raise ValueError(f"leaf {i} of {self.name} always fails")
        if i not in spec.get("diverge", []):
            return leaf_value(i, spec)
        first = self.enqueue("leaf2", i, 1, spec)
        if _once(Path(spec["dir"]) / f"attempt-{self.name}-{i}"):
            self.deferred_result("first_attempt", [first], i, spec)
            raise RuntimeError(f"leaf {i} of {self.name}: first attempt fails after fanning out")
        second = self.enqueue("leaf2", i, 2, spec)
        return self.deferred_result("pair", [first, second], i, spec)

    def leaf2(self, i: int, k: int, spec: dict[str, Any]) -> int:
        """A diverging leaf's child ``k``."""
        self._faults(spec, f"leaf2-{i}-{k}")
        return (i * 7 + k * 13 + spec["add"]) % 1009

    def pair(self, values: list[int], i: int, spec: dict[str, Any]) -> int:
        self._called(spec, f"pair{i}")
        return int(values[0]) + int(values[1])

    def first_attempt(self, values: list[int], i: int, spec: dict[str, Any]) -> int:
        self._called(spec, f"first_attempt{i}")
        return 1_000_000 + int(values[0])

    def total(self, values: list[Any], spec: dict[str, Any]) -> Any:
        self._called(spec, "total")
        self._faults(spec, "total")
        if spec["shape"] == "tolerant":
            failed = [i for i, value in enumerate(values) if isinstance(value, Failure)]
            return [failed, sum(v for v in values if not isinstance(v, Failure))]
        return sum(values)

    # Nested aggregates and chains ---------------------------------------------------------
    def fib(self, n: int, path: str, spec: dict[str, Any]) -> Any:
        """fib with leaves ``n + salt``; ``path`` names the node (``0``: n-1, ``1``: n-2)."""
        self._faults(spec, f"fib{path}")
        if n < 2:
            return n + spec["salt"]
        children = [self.enqueue("fib", n - 1, path + "0", spec),
                    self.enqueue("fib", n - 2, path + "1", spec)]
        return self.deferred_result("add", children, path, spec)

    def add(self, values: list[int], path: str, spec: dict[str, Any]) -> int:
        self._called(spec, f"add{path}")
        self._faults(spec, f"add{path}")
        return int(values[0]) + int(values[1])

    def step(self, n: int, spec: dict[str, Any]) -> Any:
        """Step ``n`` of a chain: the next step's JobRef; step 0 ends it with a value."""
        self._faults(spec, f"step{n}")
        if n == 0:
            return f"end-{spec['salt']}-{spec['depth']}"
        return self.enqueue("step", n - 1, spec)

    # Faults -------------------------------------------------------------------------------
    def _faults(self, spec: dict[str, Any], label: str) -> None:
        """Die once at a ``die`` label (in a worker); raise at a ``broken`` one until fixed."""
        folder = Path(spec["dir"])
        if label in spec.get("die", []) and os.environ.get("PACKMULE_TORTURE_WORKER") \
                and _once(folder / f"die-{self.name}-{label}"):
            os.kill(os.getpid(), signal.SIGKILL)
        if label in spec.get("broken", []) and not (folder / f"fix-{self.name}").exists():
            raise ValueError(f"{label} of {self.name} is broken until fixed")

    def _called(self, spec: dict[str, Any], label: str) -> None:
        with open(Path(spec["dir"]) / "calls", "a") as out:
            out.write(f"{self.name} {label}\n")

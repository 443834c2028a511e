"""Multi-step tasks, resque-multi-step's model on packmule's own protocol.

A task is a run of :class:`MultiStepRunner`, started by its caller without
blocking: ``add_job`` enqueues a parallel job calling a plain module-level
function; ``close`` (or leaving the ``with`` block) registers the
finalization steps as a chain of worker-side aggregates: the first over
every parallel job, each next over the one before, and the run's root
chained to the last, exactly as a ``run_async`` run whose jobs returned
deferred results. Nothing here is a second mechanism: counts are the run's
progress counters, the value is the run's record, a failure buries its job
and a kick after the fix resumes the task.

Workers run a task's functions only from the modules of their ``--import``
list; :class:`MultiStepRunner` itself is packmule's and allowed everywhere.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from types import TracebackType
from typing import Any

from packmule import resume, runs
from packmule.aggregate import Batches
from packmule.backends import backends
from packmule.envelope import check_args
from packmule.errors import DecodeError, EnqueueError, UnknownRun
from packmule.jobref import JobRef
from packmule.progress import Progress, run_progress
from packmule.runner import Context, Runner


class MultiStepRunner(Runner):
    """The runner of every multi-step task: its jobs call a task's functions."""

    _allowed: frozenset[str] = frozenset()

    def call(self, function: str, args: list[Any]) -> Any:
        """A parallel job: ``function(*args)``."""
        return _resolve(function, self._allowed)(*args)

    def step(self, values: list[Any], function: str | None, args: list[Any], first: bool) -> Any:
        """A finalization step, as an aggregate: ``function(previous, *args)``.

        ``previous`` is the list of the parallel jobs' values for the first
        step, the value of the step before for the others. Without a function
        (a task with no finalization step), the parallel values themselves.
        """
        previous = values if first else values[0]
        if function is None:
            return previous
        return _resolve(function, self._allowed)(previous, *args)

    def _admit(self, method: str, args: list[Any], allowed: frozenset[str]) -> None:
        """Refuse a job naming a function outside the worker's ``--import`` modules."""
        self._allowed = allowed
        function = args[0] if args else None
        if function is not None:
            if not isinstance(function, str):
                raise DecodeError(f"multi-step job {method}(): its function {function!r} is not "
                                  "'module:name'")
            _resolve(function, allowed)


def function_path(function: Callable[..., Any]) -> str:
    """``module:name`` of a plain module-level function, how workers find it.

    Raises:
        EnqueueError: not a plain function of a module workers can import (a
            lambda, a method, a nested function, a builtin, or one defined in
            the script being run).
    """
    name = getattr(function, "__qualname__", None)
    if not inspect.isfunction(function) or name != function.__name__ or name == "<lambda>":
        raise EnqueueError(f"{function!r} is not a plain module-level function: workers find a "
                           "task's functions by module and name")
    if function.__module__ == "__main__":
        raise EnqueueError(f"{name} is defined in the script being run (__main__), which workers "
                           "cannot import: move it to a module and start workers with "
                           "--import that.module")
    return f"{function.__module__}:{name}"


def _resolve(path: str, allowed: frozenset[str]) -> Callable[..., Any]:
    """The function ``module:name`` names, imported only from ``allowed`` modules.

    Raises:
        DecodeError: the module is not allowed, or holds no such plain function.
    """
    module_name, _, name = path.partition(":")
    if module_name not in allowed:
        raise DecodeError(f"task function {path}: module {module_name!r} is not in this worker's "
                          f"--import list ({', '.join(sorted(allowed))}): start workers with "
                          f"--import {module_name}")
    target = getattr(importlib.import_module(module_name), name, None)
    if not inspect.isfunction(target) or target.__qualname__ != name:
        raise DecodeError(f"{path} is not a plain function of module {module_name} (renamed or "
                          "removed since the task was created?)")
    return target


class MultiStepTask:
    """Parallel jobs, then finalization steps that run one after another.

    ::

        with MultiStepTask.create("thumbnails") as task:
            for photo in photos:
                task.add_job(resize, photo, 200)       # in parallel
            task.add_finalization_job(zip_all, "out.zip")  # zip_all(sizes, "out.zip")
            task.add_finalization_job(notify)           # notify(<zip_all's value>)
        MultiStepTask.find(task.id).finished

    Leaving the block closes the task (or call :meth:`close`): no job can be
    added after, and the steps start once every parallel job has finished.
    A block left by an exception cancels the task instead. A task never
    closed stays running (until its record's lease runs out).
    """

    def __init__(self, runner: MultiStepRunner, task_id: str) -> None:
        """Use :meth:`create` or :meth:`find`."""
        self._runner = runner
        self.id = task_id
        self.name = runner.name
        self._jobs: list[JobRef] = []
        self._steps: list[tuple[str, list[Any]]] = []

    @classmethod
    def create(cls, name: str, **options: Any) -> MultiStepTask:
        """Start a task; add jobs to the object returned, then close it.

        ``options`` are runner options (``tube``, ``priority``, ``max_retries``,
        ``time_to_run``...). The task's id (``.id``) reaches it from any process.
        """
        runner = MultiStepRunner(name, **options)
        scope = runner._begin(resumable=True)
        runner._context = Context(scope, Batches(scope, "caller"))
        return cls(runner, scope.run)

    @classmethod
    def find(cls, task_id: str) -> MultiStepTask:
        """The task ``task_id``, to read (counts, state, value) or cancel.

        Raises:
            UnknownRun: no task of that id is known: never created, expired
                ``result_ttl_seconds`` after it ended, or the id of another run.
        """
        record = MultiStepRunner.find_run(task_id) if isinstance(task_id, str) else None
        if record is None:
            raise UnknownRun(f"no multi-step task {task_id!r} is known (never created, expired "
                             "after result_ttl_seconds, or the id of another kind of run)")
        return cls(MultiStepRunner(record.name), task_id)

    # Building ------------------------------------------------------------------------------
    def add_job(self, function: Callable[..., Any], *args: Any) -> JobRef:
        """Enqueue ``function(*args)`` as a parallel job; its JobRef.

        Raises:
            EnqueueError: the task is closed (or was found, not created here),
                or ``function`` is not a plain module-level function; and
                what `Runner.enqueue` raises. Nothing is enqueued then.
        """
        self._context("add_job")
        ref = self._runner.enqueue("call", function_path(function), list(args))
        self._jobs.append(ref)
        return ref

    def add_finalization_job(self, function: Callable[..., Any], *args: Any) -> None:
        """Add a step ``function(previous, *args)``, run after the parallel jobs and earlier steps.

        ``previous`` is the list of the parallel jobs' values (in the order
        they were added) for the first step, the previous step's value after.
        """
        self._context("add_finalization_job")
        path = function_path(function)
        check_args(path, args)
        self._steps.append((path, list(args)))

    def close(self) -> None:
        """No more jobs: the steps run once every parallel job has finished.

        The task's value is the last step's; without steps, the list of the
        parallel jobs' values (gathered by one step of packmule's own, which
        counts as a job).
        """
        context = self._context("close")
        steps: list[tuple[str | None, list[Any]]] = list(self._steps) or [(None, [])]
        previous: list[JobRef] = self._jobs
        for index, (function, args) in enumerate(steps):
            ref = self._runner._defer_to_workers(context, previous, "step",
                                                 (function, args, index == 0), allow_failures=False)
            previous = [ref]
        # The job numbers taken ahead and unused are uncounted before the root is chained:
        # the run may end then (every step done already), its counts read for its record.
        context.batches.release()
        resume.chain_root(context.scope, context.batches, previous[0])
        self._runner._context = None
        self._jobs = []

    def __enter__(self) -> MultiStepTask:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 _tb: TracebackType | None) -> None:
        if self._runner._context is None:
            return
        if err is None:
            self.close()
            return
        self._runner._context = None
        self.cancel()

    def _context(self, action: str) -> Context:
        context = self._runner._context
        if context is None:
            raise EnqueueError(f"multi-step task {self.id} ({self.name}): cannot {action}: jobs "
                               "are added through the object create() returned, before close()")
        return context

    # Reading -----------------------------------------------------------------------------
    def progress(self) -> Progress:
        """Completed, failed and total jobs and the state, in one read (constant cost)."""
        return run_progress(backends(), self.id)

    @property
    def completed_count(self) -> int:
        """Jobs and steps finished with a value."""
        return self.progress().completed

    @property
    def failed_count(self) -> int:
        """Jobs and steps that failed for good (buried)."""
        return self.progress().failed

    @property
    def total_job_count(self) -> int:
        """Parallel jobs and finalization steps counted so far."""
        return self.progress().total

    @property
    def finished(self) -> bool:
        """Whether the task ended: done, failed, lost or cancelled."""
        return self.progress().finished

    def get_return_value(self) -> Any:
        """The last step's value.

        Raises:
            UnknownRun: the task expired. ResultPending: still running.
            RunFailed, ResultMissing, RunCancelled: how it ended.
        """
        record = runs.observe(backends(), self.id)[0]
        if record is None:
            raise UnknownRun(f"no multi-step task {self.id!r} is known (expired?)")
        return self._runner._value_of(record)

    def cancel(self) -> bool:
        """Cancel the task: its jobs are dropped, its steps never run; False if it had ended."""
        return runs.cancel(backends(), self.id)

    def __repr__(self) -> str:
        return f"<MultiStepTask {self.name!r} id={self.id}>"

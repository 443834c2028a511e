"""`Runner`: what users subclass to fan work out and bring it back.

A run is identified by (runner class, name) and by its run id; the name
finds the latest started run. In the caller's process,
``run()`` executes the user's ``run`` method there and a `deferred_result`
blocks until its aggregate fires, then calls the aggregate method in the
caller. Inside a worker, `deferred_result` returns a JobRef at once: the
aggregate becomes a job, parked in beanstalkd until etcd decides it fires.
"""

from __future__ import annotations

import functools
import math
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from types import CodeType
from typing import Any, ClassVar

from packmule import aggregate, leftovers, markers, puts, resume, runs, waiting, wakeup
from packmule.aggregate import ROOT_JOB, Batches, RunScope
from packmule.backends import Backends, backends
from packmule.config import check_tube
from packmule.envelope import (
    BodyTemplate,
    Envelope,
    check_args,
    dumps,
    encode_args,
    encode_each,
    stamp,
)
from packmule.errors import (
    ConfigurationError,
    EnqueueError,
    JobCancelled,
    PackmuleError,
    ResultMissing,
    ResultPending,
    RunCancelled,
    RunFailed,
    UnknownMethod,
    UnknownRun,
)
from packmule.jobref import JobRef
from packmule.outcome import Outcome
from packmule.progress import Progress, read_progress
from packmule.queue import PARK_SECONDS, Queue, Sent
from packmule.runs import RunRecord

_OPTIONS = ("record_return_values", "push_progress_updates", "time_to_run", "priority", "tube",
            "max_retries", "halt_on_data_loss", "time_limit")


@dataclass(slots=True)
class Context:
    """Where enqueues happen: a caller's run (``job`` None) or one job's execution."""

    scope: RunScope
    # A job's are made at its first enqueue, if any (most jobs make none): see batches.
    made_batches: Batches | None
    job: int | None = None
    batch: str = ""
    # The last job template built, by (batch, method, tube): a loop of single
    # enqueues would otherwise encode the same runner, run and options each time.
    template: tuple[tuple[str, str, str], BodyTemplate] | None = None
    # The last wait that raised RunFailed, and how to hand what it waited for to
    # the workers (see packmule.resume): the JobRef the run's root can chain to.
    failed_wait: tuple[BaseException, Callable[[], JobRef]] | None = None
    # Single enqueues of a caller, put without waiting for beanstalkd's reply
    # (batch, job, method, reply), and jobs found not put: see _settle. Made when
    # first needed (a caller's): a job's context is made per job, and never has them.
    sent: deque[tuple[str, int, str, Sent]] | None = None
    unput: dict[int, str] | None = None
    # The method of the last single enqueue: checked (see Runner.enqueue). A loop of
    # enqueues names it with the same str object every time: `is` recognizes it.
    single_method: str | None = None
    # The put time of the last single enqueue, in whole milliseconds, and as a body
    # carries it: formatting a float costs more than the rest of a body.
    stamp_ms: int = -1
    stamped: bytes = b""

    @property
    def batches(self) -> Batches:
        """The batches this context enqueues in (a job's replay its calls, see Batches)."""
        if self.made_batches is None:
            self.made_batches = Batches(self.scope, str(self.job), replayable=True)
        return self.made_batches


class Runner:
    """Subclass me; define ``run`` and the job methods it enqueues.

    Class attributes (each may also be given to the constructor):
        record_return_values: store job values for aggregates (False: they get None).
        push_progress_updates: count completed and failed jobs for progress.
        time_to_run: beanstalkd time-to-run in seconds (default: settings).
        priority: the level of the runner's jobs, 0..255, lower first (default
            128). Every job of a lower level goes before any of a higher one;
            within a level, runs share the workers (see :func:`job_priority`).
        tube: beanstalkd tube (default: settings).
        max_retries: retries of a raising job before it fails (default: settings).
        halt_on_data_loss: raise ResultMissing when memcached lost a value;
            False passes ``packmule.MISSING`` in its place and counts it.
        time_limit: seconds a job may run; past it, its process is killed and
            the job fails like a raising job (retries apply). Each job then
            runs in a process of its own, forked per job (see packmule.limits).
    """

    record_return_values: ClassVar[bool] = True
    push_progress_updates: ClassVar[bool] = True
    time_to_run: ClassVar[float | None] = None
    priority: ClassVar[int] = 128
    tube: ClassVar[str | None] = None
    max_retries: ClassVar[int | None] = None
    halt_on_data_loss: ClassVar[bool] = True
    time_limit: ClassVar[float | None] = None

    def __init__(self, name: str = "default", **options: Any) -> None:
        if not isinstance(name, str) or not name or len(name) > 200 or "\n" in name:
            raise ConfigurationError(f"runner name {name!r}: a non-empty line of at most 200 chars")
        for key, value in options.items():
            if key not in _OPTIONS:
                raise ConfigurationError(f"{type(self).__name__}: unknown option {key!r}")
            setattr(self, key, value)
        checked = _checked_key(type(self), options)
        if checked not in _CHECKED_OPTIONS:
            dumps(options, what=f"options of {type(self).__name__}")
            self._check_options()
            if checked is not None and len(_CHECKED_OPTIONS) < 10_000:
                _CHECKED_OPTIONS.add(checked)
        self.name = name
        self.options = options
        self._context: Context | None = None
        self._progress: Progress | None = None

    def _check_options(self) -> None:
        """Refuse option values beanstalkd or packmule cannot use, naming them."""
        name = type(self).__name__
        for flag in ("record_return_values", "push_progress_updates", "halt_on_data_loss"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigurationError(f"{name}.{flag}: {getattr(self, flag)!r} is not a bool")
        ttr = self.time_to_run
        if ttr is not None and (isinstance(ttr, bool) or not isinstance(ttr, int | float)
                                or ttr < 2):
            raise ConfigurationError(f"{name}.time_to_run: {ttr!r} is not a number of seconds >= 2")
        limit = self.time_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float)
                                  or not 0 < limit < 2**31):
            raise ConfigurationError(f"{name}.time_limit: {limit!r} is not a number of seconds > 0")
        retries = self.max_retries
        if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)
                                    or retries < 0):
            raise ConfigurationError(f"{name}.max_retries: {retries!r} is not an int >= 0")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) \
                or not 0 <= self.priority < puts.PRIORITY_LEVELS:
            raise ConfigurationError(
                f"{name}.priority: {self.priority!r} is not a level in 0..{puts.PRIORITY_LEVELS - 1} "
                "(lower runs first; the job's position in its run is added below it)")
        if self.tube is not None and not isinstance(self.tube, str):
            raise ConfigurationError(f"{name}.tube: {self.tube!r} is not a string")
        check_tube(self.tube_name)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "run" in cls.__dict__:
            cls.run = _as_run(cls.__dict__["run"])  # type: ignore[method-assign]

    # Identity ---------------------------------------------------------------
    @classmethod
    def class_path(cls) -> str:
        """``module:QualName``, how a worker finds the class.

        Raises:
            EnqueueError: a worker could never import the class: it is defined
                in a script (``__main__``) or inside a function.
        """
        if cls.__module__ == "__main__":
            raise EnqueueError(
                f"{cls.__qualname__} is defined in the script being run (__main__), which "
                "workers cannot import: move it to a module and start workers with "
                "--import that.module")
        if "<locals>" in cls.__qualname__:
            raise EnqueueError(
                f"{cls.__module__}:{cls.__qualname__} is defined inside a function, where "
                "workers cannot find it: define it at the top level of its module")
        return f"{cls.__module__}:{cls.__qualname__}"

    @property
    def identity(self) -> str:
        """``module:QualName/name``: the runner class path and the run's name.

        A class path holds no ``/``, so two (class, name) pairs never share an identity.
        """
        return f"{type(self).class_path()}/{self.name}"

    @property
    def tube_name(self) -> str:
        """The tube this runner's jobs go to."""
        return self.tube or self._backends.settings.tube

    @property
    def _backends(self) -> Backends:
        return backends()

    # Fan out ---------------------------------------------------------------
    def enqueue(self, method: str, *args: Any) -> JobRef:
        """Run ``self.method(*args)`` as a job; its JobRef.

        Raises:
            UnknownMethod, EncodeError, JobTooBig: nothing was enqueued.
            QueueUnavailable, StoreUnavailable: naming the server.
        """
        context = self._context
        if context is None or method is not context.single_method:  # first call, or another's
            self._check_method(method)
            return self._enqueue_many(method, [encode_args(method, args)])[0]
        return self._enqueue_one(context, method, encode_args(method, args))

    def enqueue_in(self, seconds: float, method: str, *args: Any) -> JobRef:
        """Run ``self.method(*args)`` as a job no sooner than ``seconds`` from now; its JobRef.

        beanstalkd holds the job delayed, in whole seconds (a fraction is
        rounded up). It is counted in the run's progress at once, like any
        job, so the run's total is right from the start and an aggregate over
        it waits for it. Workers need not be running meanwhile.

        Raises:
            EnqueueError: ``seconds`` is not a number in 0..2**31-1 (nothing enqueued).
            UnknownMethod, EncodeError, JobTooBig, QueueUnavailable: as `enqueue`.
        """
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
                or not 0 <= seconds < PARK_SECONDS:
            raise EnqueueError(f"enqueue_in({seconds!r}, {method!r}): the delay is not a number "
                               f"of seconds in 0..{PARK_SECONDS - 1}")
        self._check_method(method)
        return self._enqueue_many(method, [encode_args(method, args)], delay=math.ceil(seconds))[0]

    def enqueue_each(self, method: str, items: Iterable[Any], *args: Any) -> list[JobRef]:
        """One job ``self.method(item, *args)`` per item, counted as one batch.

        Every job is encoded and checked before the first is put, and the whole
        batch is counted before the first can finish, so progress never goes back.
        """
        self._check_method(method)
        return self._enqueue_many(method, encode_each(method, items, args))

    def _enqueue_many(self, method: str, encoded: list[bytes], *, delay: int = 0) -> list[JobRef]:
        """Count, size-check and put jobs with these encoded arguments; their JobRefs in order.

        Each job's arguments were encoded once, before anything is counted (a
        bad value is refused with nothing to undo); the rest of the body is
        shared by the call. Every job is checked against its server's
        max-job-size before the first put, and the puts are pipelined per
        server. Whatever was not put is uncounted. Only the encoded arguments
        are kept for the whole call: bodies are built a chunk at a time as
        they are sent, so a million jobs take tens of MB, not hundreds.
        """
        context = self._current_context()
        if not encoded:
            return []
        if len(encoded) == 1 and not delay and not context.batches.replayable:
            return [self._enqueue_one(context, method, encoded[0])]
        signature = aggregate.call_signature(method, *encoded) if context.batches.replayable else ""
        first, batch = context.batches.reserve(len(encoded), signature)
        queue, tube = context.scope.backends.queue, self.tube_name
        stored: list[int] = []
        try:
            puts.put_each(queue, tube, self._template(context, batch, method, tube), method, first,
                          encoded, level=self.priority, enqueued=stamp(time.time()), delay=delay,
                          ttr=self._ttr(), stored=stored)
        finally:
            puts.uncount(context, batch, len(encoded) - len(stored))
        return puts.refs(context.scope, first, len(encoded), batch)

    def _enqueue_one(self, context: Context, method: str, args: bytes) -> JobRef:
        """A caller's single enqueue, put without waiting for beanstalkd's reply.

        A loop of enqueues then costs no round trip per call: the job number
        comes from a block taken ahead (see Batches), and the put's reply is
        read later, with hundreds of others, or before anything can depend on
        the job (see :func:`puts.settle`). A refusal found in an earlier put's
        reply is raised here, before this job is numbered. The run's settings
        give the tube and time-to-run (those it began with, as its queue).
        """
        sent = context.sent
        if sent is None:
            sent = context.sent = deque()
        elif sent and sent[0][3].read:  # replies read since the last call: settle them
            puts.settle(context, wait=False)
        number, batch = context.batches.reserve(1)
        scope = context.scope
        settings, queue = scope.backends.settings, scope.backends.queue
        tube = self.tube or settings.tube
        try:
            body = self._template(context, batch, method, tube).body(number, args, _stamp(context))
            index = queue.server_for(number)
            puts.check_size(queue, index, method, len(body))
            reply = queue.send_put(index, tube, body, priority=puts.job_priority(self.priority, number),
                                   delay=0, ttr=self.time_to_run or settings.ttr_seconds)
        except BaseException:
            puts.uncount(context, batch, 1)
            raise
        sent.append((batch, number, method, reply))
        context.single_method = method
        return JobRef(number, queue.names[index], scope.run, batch)

    def _template(self, context: Context, batch: str, method: str, tube: str) -> BodyTemplate:
        """What the bodies of one call's jobs share; the last one made is kept for the next call."""
        key = (batch, method, tube)
        if context.template is None or context.template[0] != key:
            context.template = (key, self._new_template(context, batch, method, tube))
        return context.template[1]

    def _new_template(self, context: Context, batch: str, method: str, tube: str,
                      **extra: Any) -> BodyTemplate:
        """What the bodies of one call's jobs share (``extra``: Envelope fields, as ``aggregate``)."""
        # The tube travels with the job: a run's jobs stay in the tube it began in,
        # whatever the worker's own default tube is.
        options = {**self.options, "tube": tube}
        return BodyTemplate(Envelope(type(self).class_path(), self.name, context.scope.run, 0,
                                     batch, method, [], options, lease=context.scope.lease,
                                     **extra), signer=context.scope.backends.signer)

    def _body(self, context: Context, number: int, batch: str, method: str, args: list[Any],
              **extra: Any) -> tuple[int, bytes]:
        """One job's body and the pool index of its server; JobTooBig before anything is put."""
        template = self._new_template(context, batch, method, self.tube_name, **extra)
        body = template.body(number, encode_args(method, args), stamp(time.time()))
        queue = context.scope.backends.queue
        index = queue.server_for(number)
        puts.check_size(queue, index, method, len(body))
        return index, body

    def _put(self, queue: Queue, index: int, number: int, body: bytes, *, delay: float) -> int:
        return queue.put(index, self.tube_name, body, priority=self._job_priority(number),
                         delay=delay, ttr=self._ttr())

    def _job_priority(self, number: int) -> int:
        """beanstalkd priority of this runner's job ``number`` (see :func:`job_priority`)."""
        return puts.job_priority(self.priority, number)

    def _ttr(self) -> float:
        """beanstalkd time-to-run of this runner's jobs."""
        return self.time_to_run or self._backends.settings.ttr_seconds

    # Bring back ----------------------------------------------------------------
    def deferred_result(self, method: str, jobs: Iterable[JobRef], *args: Any,
                        allow_failures: bool = False) -> Any:
        """Call ``self.method(values, *args)`` once all ``jobs`` finished.

        ``values`` are the jobs' return values in the order of ``jobs``. In the
        caller's process this blocks and returns the aggregate's value; in a
        worker it returns the aggregate's JobRef at once (return it from the
        job to make the job's value the aggregate's). With ``allow_failures``
        the aggregate also fires when jobs failed, receiving
        ``packmule.Failure`` in their slots; otherwise a failure fails it.
        """
        self._check_method(method)
        check_args(method, args)
        context = self._current_context()
        puts.settle(context)
        deps = self._check_refs(context, jobs)
        if context.job is None:
            return self._defer_in_caller(context, deps, method, args,
                                         self._parker(context, method, args),
                                         allow_failures=allow_failures)
        return self._defer_to_workers(context, deps, method, args, allow_failures=allow_failures)

    def _parker(self, context: Context, method: str,
                args: tuple[Any, ...]) -> Callable[[int, str], tuple[int, int]]:
        """How to park the aggregate ``method(values, *args)`` as a delayed job until it fires."""
        def park(number: int, batch: str) -> tuple[int, int]:
            index, body = self._body(context, number, batch, method, list(args), aggregate=True)
            scope = context.scope
            parked = index, self._put(scope.backends.queue, index, number, body,
                                      delay=PARK_SECONDS)
            if not leftovers.note_parked_unless_dropped(scope.backends, scope.run, number, parked):
                scope.backends.queue.delete(*parked)
                raise JobCancelled(f"run {scope.run} was cancelled or purged")
            return parked

        return park

    def _defer_to_workers(self, context: Context, deps: list[JobRef], method: str,
                          args: tuple[Any, ...], *, allow_failures: bool) -> JobRef:
        """Register the aggregate as a job parked until it fires; its JobRef at once.

        What `deferred_result` does in a worker; a multi-step task does it from its caller
        (whose puts sent without waiting are answered first: a refused one raises here).
        """
        puts.settle(context)
        signature = aggregate.call_signature(
            method, encode_args(method, args), dumps(aggregate.as_ranges(ref.number for ref in deps)),
            b"allow_failures" if allow_failures else b"")
        return aggregate.register_aggregate(
            context.scope, context.batches, deps, park=self._parker(context, method, args),
            allow_failures=allow_failures, halt=self.halt_on_data_loss, signature=signature,
            method=method)[0]

    def _defer_in_caller(self, context: Context, deps: list[JobRef], method: str,
                         args: tuple[Any, ...], park: Callable[[int, str], tuple[int, int]], *,
                         allow_failures: bool) -> Any:
        """Register a caller's aggregate, block until it fires and call it here; its value.

        The aggregate has no job of its own (its parked job wakes this caller,
        see :mod:`packmule.wakeup`) unless the run fails on it and is handed to
        the workers to stay resumable (``park``, see :mod:`packmule.resume`).
        """
        ref, record, waker = self._register_in_caller(context, deps, method, allow_failures)

        def hand_over() -> JobRef:
            parked = park(ref.number, record["own"])
            resume.park_caller_aggregate(context.scope, ref.number, record, parked)
            return ref

        return self._await(context, ref, record, waker,
                           lambda values: getattr(self, method)(values, *args), hand_over)

    def _register_in_caller(self, context: Context, deps: list[JobRef], method: str,
                            allow_failures: bool
                            ) -> tuple[JobRef, dict[str, Any], wakeup.WakeUp]:
        """Register an aggregate this caller waits for, with its wake-up parked."""
        waker = wakeup.WakeUp(context.scope)
        try:
            ref, record = aggregate.register_aggregate(
                context.scope, context.batches, deps, park=waker.park,
                allow_failures=allow_failures, halt=self.halt_on_data_loss, method=method)
            context.batches.release()  # exact progress while waiting
        except BaseException:
            waker.stop()
            raise
        return ref, record, waker

    def _check_refs(self, context: Context, jobs: Iterable[JobRef]) -> list[JobRef]:
        deps = list(jobs)
        for index, ref in enumerate(deps):
            if not isinstance(ref, JobRef) or ref.run != context.scope.run:
                raise EnqueueError(f"deferred_result: jobs[{index}] = {ref!r} is not a JobRef "
                                   f"of this run ({context.scope.run})")
            if context.unput and ref.number in context.unput:
                raise EnqueueError(f"deferred_result: jobs[{index}] = {ref!r} was never put: "
                                   f"{context.unput[ref.number]}")
        return deps

    def wait(self, ref: JobRef) -> Any:
        """Block (in the caller) until job ``ref`` finished; its value."""
        context = self._current_context()
        puts.settle(context)
        deps = self._check_refs(context, [ref])
        agg, record, waker = self._register_in_caller(context, deps, "wait", False)
        return self._await(context, agg, record, waker, lambda values: values[0], lambda: ref)

    def _await(self, context: Context, ref: JobRef, record: dict[str, Any],
               waker: wakeup.WakeUp, call: Callable[[list[Any]], Any],
               hand_over: Callable[[], JobRef]) -> Any:
        """Wait for the aggregate ``ref`` (described by ``record``) and call it in this process.

        ``hand_over`` gives what was waited for to the workers if the run is
        to stay resumable after a failure (see :mod:`packmule.resume`).
        """
        scope = context.scope
        try:
            values = waiting.until_fired(scope, ref.number,
                                         lambda: waiting.settled_values(scope, record),
                                         waker=waker)
        except RunFailed as err:
            context.failed_wait = (err, hand_over)
            raise
        value = call(values)
        if isinstance(value, JobRef):
            value = self.wait(value)
        aggregate.complete(scope, ref.number, record["own"], Outcome.done(None))
        return value

    # Whole runs ------------------------------------------------------------------
    def run_async(self, *args: Any, **kwargs: Any) -> JobRef:
        """Start ``run(*args, **kwargs)`` on a worker and return its JobRef at once."""
        self._check_method("run")
        check_args("run", args)
        dumps(kwargs, what="keyword arguments of run()")
        scope = self._begin(resumable=True)
        context = Context(scope, Batches(scope, "root"))
        try:
            scope.backends.store.add(scope.keys.batch_done("root"), b"0")
            index, body = self._body(context, ROOT_JOB, "root", "run", list(args), kwargs=kwargs)
            self._put(scope.backends.queue, index, ROOT_JOB, body, delay=0)
        except BaseException as err:  # the run never started: say so, not "running"
            runs.finish(scope.backends, scope.run, _failure(err), resumable=False)
            raise
        return JobRef(ROOT_JOB, scope.backends.queue.names[index], scope.run, "root")

    def _begin(self, *, resumable: bool = False) -> RunScope:
        record = runs.start(self._backends, type(self).class_path(), self.name, resumable=resumable)
        return RunScope(record.run, record.lease, self.identity, self._backends,
                        self.push_progress_updates)

    def _current_context(self) -> Context:
        """The context enqueues happen in: the caller's ``run()`` or a job's execution.

        Raises:
            EnqueueError: called outside both. A job enqueued there would belong
                to no run that could ever finish, so it is refused.
        """
        if self._context is None:
            name = type(self).__name__
            raise EnqueueError(
                f"{name}: enqueue, enqueue_each, deferred_result and wait work inside a run: "
                f"call them from {name}.run() (or a job method), started with "
                f"{name}(name).run(...) or .run_async(...)")
        return self._context

    def _check_method(self, method: str) -> None:
        """UnknownMethod unless ``method`` names a public job method of this runner's class."""
        target = getattr(type(self), method, None) if isinstance(method, str) else None
        if (not isinstance(method, str) or method.startswith("_") or not callable(target)
                or (method in _BASE_API and method != "run")):
            raise UnknownMethod(f"{type(self).__name__} has no public job method {method!r}")

    # Reading ---------------------------------------------------------------------
    def update_progress(self) -> Progress:
        """Read the latest started run's progress (constant cost whatever its size).

        A running run whose state memcached lost reads ``lost``, and is recorded lost.
        """
        self._progress = read_progress(self._backends, type(self).class_path(), self.name)
        return self._progress

    def current_progress(self) -> Progress:
        """The progress last read by `update_progress`, reading it if never read."""
        return self._progress or self.update_progress()

    @classmethod
    def find(cls, name: str = "default") -> RunRecord | None:
        """The record of the latest started run of ``name``; None if no run is known.

        Of two runs of one name, the one started last, whichever ends first.
        A running run whose state memcached lost is recorded, and returned, ``lost``.
        """
        run = runs.latest_run(backends(), cls.class_path(), name)
        return None if run is None else runs.observe(backends(), run)[0]

    @classmethod
    def find_run(cls, run_id: str) -> RunRecord | None:
        """The record of run ``run_id`` (``JobRef.run``); None if unknown or of another class.

        On ``Runner`` itself, a run of any class. Loss is checked as by `find`.
        """
        record = runs.observe(backends(), run_id)[0] if run_id else None
        if record is None or (cls is not Runner and record.runner != cls.class_path()):
            return None
        return record

    @classmethod
    def find_runs(cls, name: str = "default", *, limit: int = 10) -> list[RunRecord]:
        """The records of the last ``limit`` runs started under ``name``, newest first.

        Every run stays listed until its record expires, ``result_ttl_seconds``
        after it ended. Lists the name's index (its keys only, O(runs kept)),
        then reads each run listed (loss checked as by `find`).
        """
        ids = runs.history(backends(), cls.class_path(), name)[::-1][:max(0, limit)]
        records = (runs.observe(backends(), run)[0] for run in ids)
        return [record for record in records if record is not None]

    def get_return_value(self) -> Any:
        """The value of the latest started run.

        Raises:
            UnknownRun: no run is known. ResultPending: still running.
            RunFailed, ResultMissing, RunCancelled: how it ended (ResultMissing
            too for a running run whose state memcached lost).
        """
        record = self.find(self.name)
        if record is None:
            raise UnknownRun(f"no run of {self.identity} is known")
        return self._value_of(record)

    def _value_of(self, record: RunRecord) -> Any:
        """The value of the run ``record`` describes, or the error of how it stands."""
        if record.state == "running":
            raise ResultPending(f"run {record.run} of {record.identity} is still running")
        if record.state == "failed":
            raise RunFailed(_ref(self, record, record.job or 0), record.traceback,
                            method=record.method, run=record.run)
        if record.state == "lost":
            raise ResultMissing(f"run {record.run} of {record.identity}: {record.traceback}",
                                [_ref(self, record, n) for n in record.lost_jobs])
        if record.state == "cancelled":
            raise RunCancelled(f"run {record.run} of {record.identity} was cancelled")
        return markers.restore(record.value)

    def cancel(self) -> bool:
        """Cancel the latest started run: its jobs are dropped, its aggregates never fire.

        Returns True if the run was running and is now cancelled; False if it
        had already ended (its outcome stays as it was).

        Raises:
            UnknownRun: no run of this name is known.
        """
        run = runs.latest_run(self._backends, type(self).class_path(), self.name)
        if run is None:
            raise UnknownRun(f"no run of {self.identity} is known")
        return runs.cancel(self._backends, run)

    def _admit(self, method: str, args: list[Any], allowed: frozenset[str]) -> None:
        """Refuse a job this worker must not run, beyond its method (DecodeError).

        Called by a worker before the job runs, with its ``--import`` list. A
        hook for packmule's own runners (a multi-step task checks the module
        of the function a job names); a runner's own class was checked already.
        """

    def handle_error(self, exc: BaseException, method: str, args: list[Any]) -> Any:
        """Override to supply a value for a job that kept failing.

        Return a value to use it as the job's value (counted as handled);
        re-raise (the default) to let the job fail and be buried.
        """
        raise exc

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Override: the whole work. Called in the caller by ``run()``."""
        raise NotImplementedError(f"{type(self).__name__} must define run()")


# (class, options) already checked: a worker builds a runner for every job.
_CHECKED_OPTIONS: set[tuple[type, frozenset[tuple[str, type, Any]]]] = set()


def _checked_key(cls: type,
                 options: dict[str, Any]) -> tuple[type, frozenset[tuple[str, type, Any]]] | None:
    """The key of these options in _CHECKED_OPTIONS; None if a value is unhashable (never cached).

    Each value's type is part of the key: ``True == 1``, but ``priority=True`` is refused.
    """
    try:
        key = (cls, frozenset((name, type(value), value) for name, value in options.items()))
        hash(key)
    except TypeError:
        return None
    return key


_BASE_API = frozenset(name for name in vars(Runner) if not name.startswith("_"))


def _stamp(context: Context) -> bytes:
    """Now as a body's ``enqueued`` value (see :func:`envelope.stamp`), formatted once a millisecond."""
    now_ms = time.time_ns() // 1_000_000
    if now_ms != context.stamp_ms:
        context.stamp_ms, context.stamped = now_ms, stamp(now_ms / 1000)
    return context.stamped


def _ref(runner: Runner, record: RunRecord, number: int) -> JobRef:
    queue = runner._backends.queue
    return JobRef(number, queue.names[queue.server_for(number)], record.run)


def _as_run(function: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a subclass's ``run`` so a call in the caller starts and records a run."""

    @functools.wraps(function)
    def run(self: Runner, *args: Any, **kwargs: Any) -> Any:
        if self._context is not None:  # a worker executing the root job, or nested
            return function(self, *args, **kwargs)
        scope = self._begin()
        self._context = context = Context(scope, Batches(scope, "caller"))
        returned: JobRef | None = None
        try:
            result = function(self, *args, **kwargs)
            if isinstance(result, JobRef):
                returned = result
                result = self.wait(returned)
            puts.settle(context)  # a job found not put fails the run
            context.batches.release()
            outcome = Outcome.done(result)
            outcome.encode(what=f"the value {type(self).__name__}.run() returned")
        except BaseException as err:
            with suppress(PackmuleError):  # the run fails with err: its counts made right
                puts.settle(context)
            with suppress(PackmuleError):
                context.batches.release()
            target = _resume_target(context, err, function.__code__, returned)
            runs.finish(scope.backends, scope.run, _failure(err), resumable=target is not None)
            if target is not None:
                resume.chain_root(scope, context.batches, target)
            raise
        finally:
            self._context = None
        runs.finish(scope.backends, scope.run, outcome)
        return result

    return run


def _resume_target(context: Context, err: BaseException, code: CodeType,
                   returned: JobRef | None) -> JobRef | None:
    """What the failed run's root can be chained to, so a kick resumes it; None if unknown."""
    if context.failed_wait is None or context.failed_wait[0] is not err:
        return None
    waits = (Runner.deferred_result.__code__, Runner.wait.__code__)
    if returned is None and not resume.returned_directly(err, code, waits):
        return None
    try:
        return context.failed_wait[1]()
    except JobCancelled:  # cancelled or purged meanwhile: nothing is left to resume
        return None


def _failure(err: BaseException) -> Outcome:
    if isinstance(err, ResultMissing):
        return Outcome.missing([ref.number for ref in err.jobs], str(err))
    if isinstance(err, RunFailed):
        return Outcome.failed(err.job.number if err.job else 0, err.traceback, own=False,
                              method=err.method)
    return Outcome.failed(0, "".join(traceback.format_exception(err)), own=False)

"""Executing one decoded job: import its runner, call its method, record the outcome.

Separate from the worker loop so the loop stays short: this module knows
runners and the aggregate protocol, the loop knows beanstalkd and signals.
"""

from __future__ import annotations

import importlib
import logging
import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from packmule import aggregate, runs, signing
from packmule.aggregate import RunScope
from packmule.backends import backends
from packmule.envelope import Envelope, decode
from packmule.errors import DecodeError, EncodeError, ResultMissing, ServerRefused
from packmule.jobref import JobRef
from packmule.outcome import Outcome
from packmule.runner import Context, Runner
from packmule.signing import SignatureError
from packmule.store import refused_jobs_key

log = logging.getLogger("packmule.worker")
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


@dataclass(frozen=True)
class Verdict:
    """An aggregate job that cannot finish now: park it again until the next kick.

    A dependency's kick that came while this job was reserved found nothing
    to kick (a straggler recording its value, a buried job kicked after a
    fix succeeding), so after parking, the worker looks again (:func:`ready`).
    """

    reason: str


def load_runner(envelope: Envelope, allowed: frozenset[str]) -> type[Runner]:
    """The runner class an envelope names, imported only from ``allowed`` modules.

    Raises:
        DecodeError: the module is not allowed, or does not hold a Runner class there.
    """
    known = _CLASSES.get((envelope.runner, allowed))
    if known is not None:
        return known
    module_name, _, qualname = envelope.runner.partition(":")
    if module_name not in allowed and module_name not in BUILT_IN_RUNNERS:
        raise DecodeError(f"runner module {module_name!r} is not in this worker's --import list "
                          f"({', '.join(sorted(allowed))}): start workers with --import {module_name}")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    if not (isinstance(target, type) and issubclass(target, Runner)):
        raise DecodeError(f"{envelope.runner} is not a packmule Runner class in the module this "
                          "worker imported (renamed or removed since the job was enqueued?)")
    _CLASSES[(envelope.runner, allowed)] = target
    return target


_CLASSES: dict[tuple[str, frozenset[str]], type[Runner]] = {}  # found by load_runner
# packmule's own runners, allowed on every worker: a multi-step task's runner
# runs only functions from the worker's --import modules (see Runner._admit).
BUILT_IN_RUNNERS = frozenset({"packmule.multistep"})


def prepare(envelope: Envelope, allowed: frozenset[str], *, keep_alive: bool = True) -> Runner:
    """A runner instance set up to execute ``envelope`` in its run's context.

    Every job gets a runner of its own (jobs are independent); what jobs
    sharing a head share (the class, its checks, the run's scope) is worked
    out once per head (see :class:`Kind`).

    With ``keep_alive`` (the default), the run's lease is kept alive (see
    runs.keep_alive); a job's own process (packmule.limits) skips it: its
    worker does that, and an etcd connection made per job costs milliseconds.

    Raises:
        DecodeError: the runner is not allowed (see :func:`load_runner`), or
            the job is not (a multi-step task's function outside ``allowed``).
        UnknownMethod: the envelope names a private, inherited or missing method,
            as ``enqueue`` would have refused it (a forged or corrupt job).
        ConfigurationError: the envelope's options are not the runner's.
    """
    kind = _kind(envelope, allowed)
    runner = kind.runner()
    runner._admit(envelope.method, envelope.args, allowed)
    scope = kind.scope
    if keep_alive:
        runs.keep_alive(scope.backends, envelope.run, envelope.lease)  # the run is active
    runner._context = Context(scope, None, envelope.job, envelope.batch)
    return runner


@dataclass(frozen=True)
class Kind:
    """What a worker derives once from a job head: the runner class, checked, and the run's scope.

    ``fresh`` holds a new runner's attributes when its class keeps Runner's
    ``__init__``: a job's runner is then a copy of them, not a constructor
    call that checks the same options again.
    """

    cls: type[Runner]
    name: str
    options: dict[str, Any]
    scope: RunScope
    fresh: dict[str, Any] | None

    def runner(self) -> Runner:
        """A new runner for one job."""
        if self.fresh is None:
            return self.cls(self.name, **self.options)
        runner: Runner = object.__new__(self.cls)
        runner.__dict__.update(self.fresh)
        runner.options = dict(self.options)
        return runner


def _kind(envelope: Envelope, allowed: frozenset[str]) -> Kind:
    """The kind of ``envelope``'s job, kept per head and thread (a body of format 1: made anew)."""
    clients = backends()
    key = (envelope.head, allowed)
    kind: Kind | None = clients.kinds.get(key) if envelope.head is not None else None
    if kind is not None:
        return kind
    cls = load_runner(envelope, allowed)
    runner = cls(envelope.name, **envelope.options)
    runner._check_method(envelope.method)
    scope = RunScope(envelope.run, envelope.lease, runner.identity, clients,
                     runner.push_progress_updates)
    fresh = vars(runner).copy() if cls.__init__ is Runner.__init__ else None
    kind = Kind(cls, envelope.name, envelope.options, scope, fresh)
    if envelope.head is not None:
        if len(clients.kinds) >= 1000:
            clients.kinds.clear()
        clients.kinds[key] = kind
    return kind


def cancelled(runner: Runner) -> bool:
    """Whether the job's run was cancelled."""
    assert runner._context is not None
    return runs.is_cancelled(runner._context.scope.backends, runner._context.scope.run)


def execute(runner: Runner, envelope: Envelope) -> Verdict | Any:
    """Call the job's method; its return value, or a Verdict for an aggregate not ready.

    Exceptions from the user's method propagate to the caller (retry logic).
    """
    if not envelope.aggregate:
        return getattr(runner, envelope.method)(*envelope.args, **envelope.kwargs)
    scope = _scope(runner)
    record = aggregate.aggregate_record(scope, envelope.job)
    if record is None:
        return Outcome.missing([envelope.job], "the aggregate's description is gone")
    try:
        gathered = aggregate.gather(scope, record)
    except ResultMissing as err:  # a part of its dependency list is gone: a loss, final
        return Outcome.missing([ref.number for ref in err.jobs], str(err))
    verdict = aggregate.settle(scope, record, gathered)
    if verdict == aggregate.WAIT:
        return Verdict("kicked before its dependencies recorded their values")
    if isinstance(verdict, Outcome) and verdict.lost:
        return verdict  # recorded as the job's outcome: a loss is final
    if isinstance(verdict, Outcome):
        # Failed, but parked again: a buried dependency kicked after a fix fires it anew.
        aggregate.complete(scope, envelope.job, record["own"], verdict)
        return Verdict("a dependency failed")
    return getattr(runner, envelope.method)(gathered.values, *envelope.args)


def ready(runner: Runner, envelope: Envelope) -> bool:
    """Whether a parked aggregate would settle now: every value recorded, none failed.

    With ``allow_failures`` a failure counts as recorded.
    """
    scope = _scope(runner)
    record = aggregate.aggregate_record(scope, envelope.job)
    if record is None:
        return True  # kicked, its execution records the loss
    try:
        gathered = aggregate.gather(scope, record)
    except ResultMissing:
        return True
    return not gathered.missing and (gathered.failure is None or record["af"])


def record(runner: Runner, envelope: Envelope, result: Any) -> None:
    """Record a job's result: chain a returned JobRef, store a value or an outcome.

    Raises:
        EncodeError: the value is not JSON (a set, a datetime): nothing was recorded.
        ServerRefused: a server refused the value (over memcached's item size).
        Either fails the job for good: running it again returns the same value.
    """
    scope = _scope(runner)
    if isinstance(result, JobRef):
        assert runner._context is not None
        aggregate.register_chain(scope, runner._context.batches, envelope.job,
                                 envelope.batch, result)
        return
    aggregate.complete(scope, envelope.job, envelope.batch, _outcome(runner, result))


def record_all(results: Sequence[tuple[Runner, Envelope, Any]]) -> list[Exception | None]:
    """Record the results of a worker's batch of quick jobs, their values in one write.

    Per job, what :func:`record` would raise (the job fails for good), or
    None; an outage raises. A returned JobRef is chained on its own.
    """
    errors: list[Exception | None] = [None] * len(results)
    completing: list[aggregate.Completing] = []
    positions: list[int] = []
    for position, (runner, envelope, result) in enumerate(results):
        try:
            if isinstance(result, JobRef) or len(results) == 1:
                record(runner, envelope, result)
                continue
            completing.append((_scope(runner), envelope.job, envelope.batch, _outcome(runner,
                                                                                      result)))
            positions.append(position)
        except (EncodeError, ServerRefused) as err:
            errors[position] = err
    if completing:
        for position, error in zip(positions, aggregate.complete_all(completing), strict=True):
            errors[position] = error
    return errors


def _outcome(runner: Runner, result: Any) -> Outcome:
    """The outcome a job's ``result`` records: itself if an Outcome, else its value."""
    return result if isinstance(result, Outcome) else Outcome.done(
        result if runner.record_return_values else None)


def fail(runner: Runner, envelope: Envelope, text: str) -> None:
    """Record the job as failed for good with ``text`` (a traceback), naming its method."""
    aggregate.complete(_scope(runner), envelope.job, envelope.batch,
                       Outcome.failed(envelope.job, text, own=True, method=envelope.method))


def handle(runner: Runner, envelope: Envelope, err: BaseException) -> bool:
    """Give the runner's ``handle_error`` a chance; True if it supplied a value, recorded.

    False if it raised (the default re-raises): the caller fails the job.
    Raises what :func:`record` raises for a value that cannot be recorded.
    """
    try:
        value = runner.handle_error(err, envelope.method, list(envelope.args))
    except BaseException:  # SystemExit too: a hook's failure is the job's
        return False
    record(runner, envelope, value)
    scope = _scope(runner)
    scope.backends.store.incr_quietly(scope.keys.handled)
    return True


def fail_unrunnable(envelope: Envelope, reason: str) -> bool:
    """Fail a job no worker here can run, so its run ends saying why; False if no such run.

    The run must exist (its total counter is in memcached): a forged or
    stale job naming an unknown run is not recorded anywhere.
    """
    scope = RunScope(envelope.run, envelope.lease, f"{envelope.runner}/{envelope.name}",
                     backends())
    if scope.backends.store.get(scope.keys.total) is None:
        return False
    text = f"job {envelope.job} {envelope.method}() of {envelope.runner} cannot run: {reason}"
    aggregate.complete(scope, envelope.job, envelope.batch,
                       Outcome.failed(envelope.job, text, own=True, method=envelope.method))
    return True


def refuse(body: bytes, err: SignatureError) -> str | None:
    """Count a job refused for its signature; fail its run if the job is the run's own.

    A job with no signature, or signed with a secret this worker lacks, may
    be its run's own: the run's starter then signs the same way (its record's
    ``signer``), every job of it is refused alike, and the run must end saying
    why. Otherwise the job is taken for forged and touches no run: a forger
    cannot fail a run whose jobs are signed with a secret the workers hold,
    and a body with a wrong MAC (``invalid``) never fails one. The body is
    decoded only to name its run; nothing in it is imported or called.
    Returns the id of the run that failed, or None.
    """
    store = backends().store
    key = refused_jobs_key(backends().settings.namespace)
    store.add(key, b"0")
    store.incr_quietly(key)
    if err.reason == "invalid":
        return None
    try:
        envelope = decode(signing.unsigned(body))
    except DecodeError:
        return None
    record = runs.read_run(backends(), envelope.run)
    if record is None or record.state != "running" or record.signer != err.key_id:
        return None
    reason = f"{err} (its producer and the workers need the same secrets)"
    return envelope.run if fail_unrunnable(envelope, reason) else None


def user_traceback(err: BaseException) -> str:
    """The formatted exception, starting at the first frame outside packmule.

    The leading frames (worker, execution, the ``run`` wrapper) say nothing
    about the user's code. An error packmule raised by itself, with no frame
    of the user's, keeps them all.
    """
    start = err.__traceback__
    while start is not None and start.tb_frame.f_code.co_filename.startswith(_PACKAGE):
        start = start.tb_next
    return "".join(traceback.format_exception(type(err), err, start or err.__traceback__))


def _scope(runner: Runner) -> RunScope:
    assert runner._context is not None
    return runner._context.scope

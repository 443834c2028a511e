"""Executing one decoded job: import its runner, call its method, record the outcome.

Separate from the worker loop so the loop stays short: this module knows
runners and the aggregate protocol, the loop knows beanstalkd and signals.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from packmule import aggregate, runs
from packmule.aggregate import Batches, RunScope
from packmule.backends import backends
from packmule.envelope import Envelope
from packmule.errors import DecodeError, EncodeError
from packmule.jobref import JobRef
from packmule.outcome import Failure, Outcome
from packmule.runner import Context, Runner

log = logging.getLogger("packmule.worker")


@dataclass(frozen=True)
class Verdict:
    """What the loop does with the job: ``delete``, ``bury``, ``retry`` or ``park``."""

    action: str
    reason: str = ""


DELETE = Verdict("delete")

# Test hook, never set in production: ``POINT:FLAG`` makes the first worker
# that reaches POINT while recording a job's result create the file FLAG and
# die with SIGKILL (later executions find FLAG and go on). Points:
#   before-fire: an aggregate's dependencies are all done, its etcd "fired"
#                marker is not written yet;
#   after-fire:  the marker is written, a parked aggregate job not kicked yet;
#   before-count: the job's outcome is recorded, its progress count not sent;
#   after-count: its progress count is sent, nothing after it is;
#   after-chain: a job that returned a deferred result (a JobRef) has its
#                chain registered, and is not deleted from beanstalkd yet.
# The fault tests use it to crash a worker at those exact moments.
CRASH_HOOK = "PACKMULE_TEST_CRASH_AT"
_CRASH_POINTS = ("before-fire", "after-fire", "before-count", "after-count", "after-chain")


def load_runner(envelope: Envelope, allowed: frozenset[str]) -> type[Runner]:
    """The runner class an envelope names, imported only from ``allowed`` modules.

    Raises:
        DecodeError: the module is not allowed, or does not hold a Runner class there.
    """
    module_name, _, qualname = envelope.runner.partition(":")
    if module_name not in allowed:
        raise DecodeError(f"runner module {module_name!r} is not in this worker's --import list")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    if not (isinstance(target, type) and issubclass(target, Runner)):
        raise DecodeError(f"{envelope.runner} is not a packmule Runner class")
    return target


def prepare(envelope: Envelope, allowed: frozenset[str]) -> Runner:
    """A runner instance set up to execute ``envelope`` in its run's context.

    Raises:
        DecodeError: the runner is not allowed (see :func:`load_runner`).
        UnknownMethod: the envelope names a private, inherited or missing method,
            as ``enqueue`` would have refused it (a forged or corrupt job).
        ConfigurationError: the envelope's options are not the runner's.
    """
    cls = load_runner(envelope, allowed)
    runner = cls(envelope.name, **envelope.options)
    runner._check_method(envelope.method)
    scope = RunScope(envelope.run, envelope.lease,
                     runner.identity, backends(), runner.push_progress_updates)
    runner._context = Context(scope, Batches(scope, str(envelope.job), replayable=True), envelope.job,
                              envelope.batch)
    return runner


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
    values, lost = aggregate.gather(scope, record)
    failed = any(isinstance(v, Failure) for v in values)
    if (lost and not runs.state_lost(scope.backends, scope.run)) or (failed and not record["af"]):
        return Verdict("park", "kicked before its dependencies finished")
    if lost and record["halt"]:
        return Outcome.missing(lost, "memcached lost the values of jobs")
    if lost:
        scope.backends.store.incr_quietly(scope.keys.lost, len(lost))
    return getattr(runner, envelope.method)(values, *envelope.args)


def record(runner: Runner, envelope: Envelope, result: Any) -> None:
    """Record a job's result: chain a returned JobRef, store a value or an outcome."""
    scope = _scope(runner)
    if isinstance(result, JobRef):
        assert runner._context is not None
        with _crash_hook(scope):
            aggregate.register_chain(scope, runner._context.batches, envelope.job,
                                     envelope.batch, result)
        if os.environ.get(CRASH_HOOK, "").startswith("after-chain:"):
            _die_once(os.environ[CRASH_HOOK].partition(":")[2])
        return
    outcome = result if isinstance(result, Outcome) else Outcome.done(
        result if runner.record_return_values else None)
    try:
        with _crash_hook(scope):
            aggregate.complete(scope, envelope.job, envelope.batch, outcome)
    except EncodeError as err:
        fail(runner, envelope, f"{envelope.method}() returned a value JSON cannot carry: {err}")


def fail(runner: Runner, envelope: Envelope, text: str) -> None:
    """Record the job as failed for good with ``text`` (a traceback)."""
    aggregate.complete(_scope(runner), envelope.job, envelope.batch,
                       Outcome.failed(envelope.job, text, own=True))


def handle(runner: Runner, envelope: Envelope, err: BaseException) -> bool:
    """Give the runner's ``handle_error`` a chance; True if it supplied a value."""
    try:
        value = runner.handle_error(err, envelope.method, list(envelope.args))
    except BaseException:
        fail(runner, envelope, "".join(traceback.format_exception(err)))
        return False
    scope = _scope(runner)
    scope.backends.store.incr_quietly(scope.keys.handled)
    record(runner, envelope, value)
    return True


@contextmanager
def _crash_hook(scope: RunScope) -> Iterator[None]:
    """While recording, die at the point :data:`CRASH_HOOK` names, if it names one.

    The clients' methods are wrapped on this thread's instances for the
    duration of the recording only: the protocol code itself is unchanged.
    """
    point, _, flag = os.environ.get(CRASH_HOOK, "").partition(":")
    if point not in _CRASH_POINTS or not flag:
        yield
        return
    coord, store = scope.backends.coord, scope.backends.store
    create, incr_quietly = coord.create_if_absent, store.incr_quietly

    def create_then_maybe_die(key: str, value: bytes, *, lease: int = 0) -> bool:
        fired = key.endswith("/fired")
        if fired and point == "before-fire":
            _die_once(flag)
        created = create(key, value, lease=lease)
        if fired and point == "after-fire":
            _die_once(flag)
        return created

    def maybe_die_then_incr(key: str, amount: int = 1) -> None:
        if key == scope.keys.completed and point == "before-count":
            _die_once(flag)
        incr_quietly(key, amount)
        if key == scope.keys.completed and point == "after-count":
            _die_once(flag)

    coord.create_if_absent = create_then_maybe_die  # type: ignore[method-assign]
    store.incr_quietly = maybe_die_then_incr  # type: ignore[method-assign]
    try:
        yield
    finally:  # drop the instance attributes: the methods show again
        del coord.create_if_absent
        del store.incr_quietly


def _die_once(flag: str) -> None:
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _scope(runner: Runner) -> RunScope:
    assert runner._context is not None
    return runner._context.scope

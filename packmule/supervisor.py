"""``packmule worker --concurrency N``: N worker processes, each restarted when it dies.

The supervisor starts each worker as a child process (``python -m packmule
... worker``), in a session of its own, so a terminal's Ctrl-C reaches only
the supervisor, which forwards one signal: a child seeing two would exit
mid-job. It waits for signals with ``sigtimedwait`` (no handler at all):
SIGTERM or SIGINT is forwarded to every child (the first lets each finish
its job in hand, a second stops them at once), SIGCHLD says a child ended.

A child that died is logged with why (its exit code or signal) and started
again; one that keeps dying soon after it starts is restarted with a
doubling pause (up to ``MAX_PAUSE_SECONDS``), so a broken deploy does not
spin. With ``--burst`` a child that exited 0 (its tubes were empty) is done.

No child outlives the supervisor, even one killed by SIGKILL: each child
asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from packmule.forks import describe_exit, die_with_parent
from packmule.retry import backoff_seconds

log = logging.getLogger("packmule.supervisor")

# A child that ran this long before it died was not failing at start: restart it at once.
STABLE_SECONDS = 30.0
MAX_PAUSE_SECONDS = 30.0
_WATCHED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}


@dataclass
class _Slot:
    """One of the N places a worker process runs in."""

    number: int
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_deaths: int = 0  # in a row, each within STABLE_SECONDS of its start
    due: float | None = None  # when to start it (again); None: running or done


def supervise(argv_for: Callable[[int], list[str]], concurrency: int, *, burst: bool) -> int:
    """Run ``concurrency`` children, ``python -m packmule *argv_for(i)``, until stopped.

    Returns the exit code: 0 if every child that ended for good exited 0,
    else the largest (128 + N for a child killed by signal N).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
    slots = [_Slot(number, argv_for(number), due=0.0) for number in range(concurrency)]
    stopping, code = False, 0
    while any(slot.proc is not None or (slot.due is not None and not stopping) for slot in slots):
        if not stopping:
            _start_due(slots)
        received = signal.sigtimedwait(_WATCHED, _wait_seconds(slots, stopping))
        if received is not None and received.si_signo != signal.SIGCHLD:
            stopping = True
            _forward(slots, received.si_signo)
        for slot in slots:
            code = max(code, _reap(slot, stopping=stopping, burst=burst))
    return code


def _start_due(slots: list[_Slot]) -> None:
    now = time.monotonic()
    in_child = functools.partial(_in_child, os.getpid())
    for slot in slots:
        if slot.due is not None and slot.due <= now:
            # preexec_fn is safe here: the supervisor runs no other thread.
            slot.proc = subprocess.Popen([sys.executable, "-m", "packmule", *slot.argv],
                                         start_new_session=True, preexec_fn=in_child)
            slot.started, slot.due = now, None
            log.info("worker child %d started (slot %d)", slot.proc.pid, slot.number)


def _in_child(parent: int) -> None:
    """Before the child's exec: its signals unblocked, SIGTERM when the supervisor dies."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WATCHED)
    die_with_parent(parent, signal.SIGTERM)


def _wait_seconds(slots: list[_Slot], stopping: bool) -> float:
    """Until the next restart is due (a child's end wakes the wait earlier)."""
    dues = [slot.due for slot in slots if slot.due is not None]
    if stopping or not dues:
        return 3600.0
    return max(0.0, min(dues) - time.monotonic())


def _forward(slots: list[_Slot], signum: int) -> None:
    for slot in slots:
        if slot.proc is not None and slot.proc.poll() is None:
            slot.proc.send_signal(signum)


def _reap(slot: _Slot, *, stopping: bool, burst: bool) -> int:
    """If the slot's child ended: schedule its restart, or count its end; its exit code."""
    if slot.proc is None or slot.proc.poll() is None:
        return 0
    proc, slot.proc = slot.proc, None
    status = proc.returncode
    code = 128 - status if status < 0 else status
    if stopping or (burst and status == 0):
        return code
    lived = time.monotonic() - slot.started
    slot.quick_deaths = slot.quick_deaths + 1 if lived < STABLE_SECONDS else 0
    pause = backoff_seconds(slot.quick_deaths, base=0.5, cap=MAX_PAUSE_SECONDS) \
        if slot.quick_deaths else 0.0
    slot.due = time.monotonic() + pause
    log.warning("worker child %d (slot %d) %s after %.1f s; restarting in %.1f s", proc.pid,
                slot.number, describe_exit(status), lived, pause)
    return 0


"""Timestamps along the fan-in path, for ``run.py --profile`` only.

Imported by a worker (``--import fanin_probe``) or by the caller, it wraps a
few packmule functions so each call appends ``name start end`` (time.time())
to ``$PACKMULE_BENCH_TRACE/<pid>``. It reaches into packmule's internals on
purpose: if they were renamed, `install` says which and patches nothing.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from pathlib import Path
from typing import Any

from packmule import aggregate, coord, queue, wakeup

_out: Any = None


def _log(name: str, start: float, end: float) -> None:
    _out.write(f"{name} {start:.6f} {end:.6f}\n")


def _timed(owner: Any, name: str, label: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            _log(label, start, time.time())

    setattr(owner, name, wrapper)


def install() -> str | None:
    """Patch and start tracing; None, or why nothing was patched."""
    global _out
    folder = os.environ.get("PACKMULE_BENCH_TRACE")
    if not folder or _out is not None:
        return None if _out is not None else "PACKMULE_BENCH_TRACE is not set"
    wanted = [(aggregate, "complete"), (aggregate, "complete_all"), (aggregate, "batches_state"),
              (aggregate, "gather"), (aggregate, "aggregate_record"),
              (coord.Coordinator, "create_if_absent"), (queue.Queue, "kick_job"),
              (coord.Coordinator, "watch_prefixes"), (wakeup.WakeUp, "wait")]
    gone = [name for owner, name in wanted if not hasattr(owner, name)]
    if gone:
        return f"packmule no longer has {', '.join(gone)}"
    _out = open(Path(folder) / str(os.getpid()), "a", buffering=1)  # noqa: SIM115
    for owner, name in wanted:
        if name not in ("watch_prefixes", "wait"):
            _timed(owner, name, name)
    original = coord.Coordinator.watch_prefixes

    def watch_prefixes(self: Any, prefixes: list[str], wake: threading.Event,
                       seen: set[str] | None = None) -> Any:
        setter = wake.set

        def traced_set() -> None:
            now = time.time()
            _log("wake", now, now)
            setter()

        wake.set = traced_set  # type: ignore[method-assign]
        return original(self, prefixes, wake, seen)

    coord.Coordinator.watch_prefixes = watch_prefixes  # type: ignore[method-assign]
    waited = wakeup.WakeUp.wait

    def wait(self: Any, seconds: float) -> bool:
        woken = waited(self, seconds)
        if woken:
            now = time.time()
            _log("wake", now, now)
        return bool(woken)

    wakeup.WakeUp.wait = wait  # type: ignore[method-assign]
    return None


install()

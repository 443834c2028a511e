"""Test-only pause: hold a worker just before it parks an aggregate job again.

When ``PACKMULE_TEST_PAUSE_REPARK`` names a folder at import time, a worker
whose aggregate job settled without running (a dependency failed: the run
has failed) creates ``paused`` in it and waits for ``go`` there before it
releases the job back to the delayed state: the window in which a purge
finds the job reserved by the worker, not parked. Workers import it through
``ending_runners``; packmule itself carries no trace of it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from packmule import execution
from packmule.envelope import Envelope
from packmule.runner import Runner

PAUSE = "PACKMULE_TEST_PAUSE_REPARK"
_execute = execution.execute


def execute(runner: Runner, envelope: Envelope) -> Any:
    """``execution.execute``, pausing once its verdict is to park the job again."""
    result = _execute(runner, envelope)
    if isinstance(result, execution.Verdict):
        folder = Path(os.environ[PAUSE])
        (folder / "paused").touch()
        deadline = time.monotonic() + 30
        while not (folder / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    return result


if os.environ.get(PAUSE):
    execution.execute = execute

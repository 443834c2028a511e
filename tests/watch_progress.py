"""Run as a separate process: poll a run's progress, print each reading, then its value."""

from __future__ import annotations

import json
import sys
import time

from sleepy_runner import SleepyRunner

name = sys.argv[1]
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    progress = SleepyRunner(name).update_progress()
    print(json.dumps([progress.completed, progress.total, progress.state]), flush=True)
    if progress.finished:
        break
    time.sleep(0.02)
print(json.dumps({"value": SleepyRunner(name).get_return_value()}), flush=True)

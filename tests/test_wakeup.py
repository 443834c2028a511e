"""A blocked caller is woken by a job of its own (packmule.wakeup), against real servers.

The wake-up job is kicked by whoever fires the aggregate, before etcd syncs
the "fired" marker to disk; the marker stays the fallback. Nothing of the
wake-up may outlive the wait: its tube is gone after a run that is done,
failed or cancelled, and a caller killed while waiting leaves a job that
cancelling its run removes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable

import greenstalk
import pytest
from conftest import ROOT, Workers, in_thread, wait_until
from fault_runners import Flaky
from runners import Adder, Slow

import packmule
from packmule.backends import backends
from packmule.config import settings
from packmule.coord import Coordinator
from packmule.servers import LocalServers


def _wake_tubes() -> list[str]:
    return [tube for tube in backends().queue.tubes(0) if tube.startswith("packmule.wake.")]


def _wake_jobs(tube: str) -> int:
    stats = backends().queue.tube_stats(0, tube)
    return sum(stats.get(f"current-jobs-{state}", 0)
               for state in ("ready", "reserved", "delayed", "buried"))


def test_the_wake_up_job_alone_wakes_the_caller(env: dict[str, str], workers: Workers,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """No etcd watch in this caller, the marker's checks a minute apart: only the kicked
    job can wake it in time."""
    def no_watch(*_args: object) -> Callable[[], None]:
        return lambda: None

    monkeypatch.setattr(Coordinator, "watch_prefixes", no_watch)
    workers.start("runners", 2)
    packmule.configure(health_check_seconds=(60.0, 60.0))
    thread, outcome = in_thread(lambda: Slow("woken").run(6, 0.3))
    thread.join(timeout=30)
    assert not thread.is_alive(), "the caller was not woken by its wake-up job"
    assert outcome == {"value": 1.8}
    assert _wake_tubes() == []


def test_a_lost_wake_up_job_leaves_the_marker_to_wake_the_caller(env: dict[str, str],
                                                                 workers: Workers) -> None:
    """beanstalkd lost the job (a restart without binlog, say): the marker still wakes."""
    thread, outcome = in_thread(lambda: Slow("lost-wake").run(4, 0.1))
    tube = wait_until(lambda: next(iter(_wake_tubes()), None), timeout=20,
                      what="the caller to park its wake-up job")
    assert isinstance(tube, str)
    client = greenstalk.Client(settings().beanstalkd[0], use=tube)
    client.delete(client.peek_delayed())
    client.close()
    workers.start("runners", 2)
    thread.join(timeout=30)
    assert outcome == {"value": 0.4}
    assert _wake_tubes() == []


def test_no_wake_up_tube_outlives_a_done_failed_or_cancelled_run(
        env: dict[str, str], workers: Workers) -> None:
    workers.start("runners", 2, "--import", "fault_runners")
    assert Adder("done").run(5) == sum(range(5))
    assert _wake_tubes() == []
    with pytest.raises(packmule.RunFailed):
        Flaky("failed").run(3, 1)
    assert _wake_tubes() == []
    thread, outcome = in_thread(lambda: Slow("cancelled").run(40, 0.2))
    wait_until(lambda: Slow("cancelled").update_progress().completed >= 2, timeout=20,
               what="the run to be under way")
    assert Slow("cancelled").cancel()
    thread.join(timeout=20)
    assert isinstance(outcome.get("error"), packmule.RunCancelled)
    assert _wake_tubes() == []


def test_cancelling_the_run_of_a_killed_caller_removes_its_wake_up_job(
        env: dict[str, str]) -> None:
    """No worker: the caller waits until killed; its run's cancel finds the job by its note."""
    script = "from runners import Slow; Slow('orphan').run(3, 0.1)"
    caller = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                              env={**os.environ, **env})
    try:
        tube = wait_until(lambda: next(iter(_wake_tubes()), None), timeout=20,
                          what="the caller to park its wake-up job")
    finally:
        caller.send_signal(signal.SIGKILL)
        caller.wait(timeout=10)
    assert isinstance(tube, str) and _wake_jobs(tube) == 1
    assert Slow("orphan").cancel()
    assert _wake_jobs(tube) == 0


@pytest.mark.timeout(90)
def test_a_caller_whose_wake_up_connection_broke_still_ends_and_leaves_no_job(
        env: dict[str, str], workers: Workers, servers: LocalServers) -> None:
    """beanstalkd restarts under the caller: its pending reserve is gone, the job is kept
    (binlog) and kicked; the caller finds the marker, then deletes the job on the pool."""
    workers.start("runners", 2)
    thread, outcome = in_thread(lambda: Slow("bounced").run(20, 0.1))
    wait_until(lambda: Slow("bounced").update_progress().completed >= 2, timeout=20,
               what="the run to be under way")
    servers.restart_beanstalkd()
    thread.join(timeout=60)
    assert outcome == {"value": 2.0}
    assert _wake_tubes() == []

"""The worker registry: live workers in etcd, with the job in hand and their counts."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest
from conftest import Workers, wait_until
from ops_runners import Broken, Gated

from packmule import RunFailed
from packmule.backends import backends
from packmule.registry import WorkerInfo, list_workers


def _listed(pid: int) -> WorkerInfo | None:
    return next((info for info in list_workers(backends()) if info.pid == pid), None)


@pytest.fixture
def short_lease(env: dict[str, str]) -> dict[str, str]:
    """Workers on a 2 s registry lease, so a dead one goes within seconds."""
    env["PACKMULE_WORKER_TTL_SECONDS"] = "2"
    return env


def test_a_worker_is_listed_with_its_job_in_hand_and_its_counts(
        short_lease: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    [proc] = workers.start("ops_runners")
    info = wait_until(lambda: _listed(proc.pid), what="the worker registered")
    assert isinstance(info, WorkerInfo)
    assert (info.host, info.tubes, info.imports) == (
        socket.gethostname(), [short_lease["PACKMULE_TUBE"]], ["ops_runners"])
    assert (info.job, info.done, info.failed) == (None, 0, 0)
    gate = tmp_path / "gate"
    ref = Gated("registry").run_async(str(gate))
    busy = wait_until(lambda: (found := _listed(proc.pid)) and found.job
                      and found.job["method"] == "hold" and found, what="the job in hand shown")
    assert isinstance(busy, WorkerInfo) and busy.job is not None
    assert busy.job["run"] == ref.run and busy.job["since"] >= info.started
    gate.touch()
    wait_until(lambda: Gated("registry").update_progress().finished, what="the run's end")
    assert Gated("registry").get_return_value() == 3
    # The root job, hold, three echoes and the aggregate: six jobs done.
    wait_until(lambda: (found := _listed(proc.pid)) and (found.done, found.job) == (6, None),
               what="six jobs counted done, none in hand")
    with pytest.raises(RunFailed):
        Broken("registry").run()
    wait_until(lambda: (found := _listed(proc.pid)) and found.failed == 1,
               what="the failed job counted")


def test_a_killed_worker_disappears_and_a_stopped_one_at_once(
        short_lease: dict[str, str], workers: Workers) -> None:
    killed, stopped = workers.start("ops_runners", 2)
    wait_until(lambda: _listed(killed.pid) and _listed(stopped.pid), what="both registered")
    workers.kill9(killed)
    wait_until(lambda: _listed(killed.pid) is None, timeout=10, what="the killed worker gone")
    assert _listed(stopped.pid) is not None
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait(timeout=30) == 0
    assert _listed(stopped.pid) is None  # revoked on the way out, not left to expire

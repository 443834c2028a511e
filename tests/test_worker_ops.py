"""Operating workers: a log line per job (text and JSON), Prometheus metrics, the supervisor."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, Workers, wait_until
from ops_runners import Broken, Echo
from prometheus_client.parser import text_string_to_metric_families

from packmule import RunFailed
from packmule.backends import backends
from packmule.registry import list_workers


def _packmule(workers: Workers, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``python -m packmule ARGS`` with the test's settings, stderr to ``log``; killed at the end."""
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "packmule", *args],
                                env={**os.environ, **workers.env}, cwd=ROOT, stderr=out)
    workers.procs.append(proc)
    return proc


def _worker_args(env: dict[str, str], *extra: str) -> list[str]:
    return ["worker", "--import", "ops_runners", "--tube", env["PACKMULE_TUBE"], *extra]


def _json_lines(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def _job_lines(log: Path, method: str) -> list[dict[str, object]]:
    return [line for line in _json_lines(log) if line.get("method") == method
            and "outcome" in line and "duration" in line]


def test_each_job_logs_one_json_line_with_its_fields(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    proc = _packmule(workers, log, "--log-format", "json", *_worker_args(env))
    assert Echo("logged").run(4) == 6
    lines = wait_until(lambda: len(found := _job_lines(log, "echo")) == 4 and found,
                       what="four job lines")
    assert isinstance(lines, list)
    run = Echo.find("logged")
    assert run is not None
    assert sorted(line["job"] for line in lines) == [1, 2, 3, 4]  # type: ignore[type-var]
    for line in lines:
        assert (line["run"], line["outcome"], line["attempt"], line["level"]) == (
            run.run, "done", 1, "INFO")
        assert line["runner"] == "ops_runners:Echo" and isinstance(line["duration"], float)
        assert line["logger"] == "packmule.worker" and "echo() of run" in str(line["message"])
    with pytest.raises(RunFailed):
        Broken("logged").run()
    [failed] = wait_until(lambda: [line for line in _job_lines(log, "maybe")
                                   if line["outcome"] == "failed"], what="the failed job's line")
    assert failed["attempt"] == 1
    assert any(line["level"] == "ERROR" and "burying" in str(line["message"])
               and line.get("job") == failed["job"] for line in _json_lines(log))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert any("stopped" in str(line["message"]) for line in _json_lines(log))


def test_each_job_logs_one_text_line(env: dict[str, str], workers: Workers,
                                     tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    _packmule(workers, log, *_worker_args(env))
    assert Echo("text").run(3) == 3
    wait_until(lambda: sum(" echo() of run " in line and " done in " in line
                           for line in log.read_text().splitlines()) == 3,
               what="three text lines")
    line = next(line for line in log.read_text().splitlines() if " echo() of run " in line)
    assert " packmule.worker INFO job " in line and line.endswith("attempt 1")


def _free_ports(count: int) -> int:
    """A port P such that P..P+count-1 are free now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count <= 65535 and all(_free(first + i) for i in range(count)):
            return first
    raise AssertionError("no run of free ports")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of ``/metrics`` on ``port``, by (name, labels); {} if not served yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_count_a_runs_jobs(env: dict[str, str], workers: Workers,
                                   tmp_path: Path) -> None:
    port = _free_ports(1)
    _packmule(workers, tmp_path / "worker.log", "--log-level", "WARNING",
              *_worker_args(env, "--metrics-port", str(port), "--metrics-host", "127.0.0.1"))
    assert Echo("metrics").run(5) == 10
    done = frozenset({"runner": "ops_runners:Echo", "method": "echo", "outcome": "done"}.items())
    by_method = frozenset({"runner": "ops_runners:Echo", "method": "echo"}.items())
    samples = wait_until(lambda: (found := _scrape(port)).get(("packmule_jobs_total", done)) == 5
                         and found, what="five jobs counted done")
    assert isinstance(samples, dict)
    assert samples[("packmule_job_duration_seconds_count", by_method)] == 5
    waited = frozenset({"runner": "ops_runners:Echo"}.items())
    assert samples[("packmule_job_wait_seconds_count", waited)] == 5
    with pytest.raises(RunFailed):
        Broken("metrics").run()
    broken = frozenset({"runner": "ops_runners:Broken", "method": "maybe"}.items())
    wait_until(lambda: _scrape(port).get(("packmule_job_burials_total", broken)) == 1,
               what="the burial counted")


def _children(pid: int) -> set[int]:
    """The pids of the processes whose parent is ``pid``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_the_supervisor_restarts_a_killed_child_and_none_outlives_it(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    env["PACKMULE_WORKER_TTL_SECONDS"] = "2"
    log = tmp_path / "supervisor.log"
    supervisor = _packmule(workers, log, *_worker_args(env, "--concurrency", "2"))
    registered = wait_until(lambda: len(found := {w.pid for w in list_workers(backends())}) == 2
                            and found, what="two children registered")
    assert isinstance(registered, set) and registered == _children(supervisor.pid)
    victim = min(registered)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(now := _children(supervisor.pid)) == 2 and victim not in now,
               what="a new child in the killed one's place")
    assert Echo("supervised").run(4) == 6  # the new child works
    assert f"worker child {victim} (slot" in log.read_text()
    assert "killed by signal SIGKILL" in log.read_text()
    def family() -> set[int]:
        children = _children(supervisor.pid)
        return children | {pid for child in children for pid in _children(child)}

    everyone = wait_until(lambda: len(found := family()) == 4 and found,
                          what="two children, each with its fork server")
    assert isinstance(everyone, set)
    os.kill(supervisor.pid, signal.SIGKILL)
    wait_until(lambda: not any(_alive(pid) for pid in everyone), timeout=30,
               what="every child and fork server gone with the supervisor")


def test_a_child_that_keeps_dying_is_restarted_with_growing_pauses(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    log = tmp_path / "supervisor.log"
    supervisor = _packmule(workers, log, "worker", "--import", "no_such_module_here",
                           "--concurrency", "2")
    wait_until(lambda: log.read_text().count("exited with code 1") >= 6, timeout=60,
               what="three restarts of each child")
    pauses = [float(line.rpartition("restarting in ")[2].split()[0])
              for line in log.read_text().splitlines() if "restarting in" in line]
    assert max(pauses) > min(pauses)
    supervisor.send_signal(signal.SIGTERM)  # also while its children wait for a restart
    assert supervisor.wait(timeout=30) == 0

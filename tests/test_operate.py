"""The operator's commands against real servers: runs, show, progress, kick, cancel, purge, tubes.

Commands run in-process through click's runner (the same code the
``packmule`` command runs); one test runs the real command without the
test modules on the path, to show that reading needs no ``--import``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from conftest import ROOT, Workers, wait_until
from fault_runners import Counted, Flaky
from fibonacci_runner import FibonacciRunner
from runners import Slow

from packmule import leftovers
from packmule.backends import backends
from packmule.cli import main
from packmule.store import RunKeys

SUMMARY_KEYS = {"run", "runner", "name", "state", "counts", "started", "finished",
                "duration_seconds", "resumable"}
COUNT_KEYS = {"total", "completed", "failed", "handled", "lost"}


def cli(*args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, (args, result.output, result.exception)
    return result


def cli_json(*args: str, code: int = 0) -> Any:
    return json.loads(cli(*args, "--json", code=code).stdout)


def _failed_run(env: dict[str, str], workers: Workers, tmp_path: Path, name: str) -> str:
    """A Flaky run whose job 3 (item 2) failed for good; workers that see the fix file."""
    env["PACKMULE_TEST_FIX_FILE"] = str(tmp_path / "fixed")
    workers.start("fault_runners", 2)
    run = Flaky(name).run_async(5, 2).run
    wait_until(lambda: Flaky(name).update_progress().state == "failed", timeout=30,
               what=f"run {name} to fail")
    # The run reads failed once job 3's failure is recorded; its root job may still be
    # parking the aggregate (delayed) then, on another worker.
    tube = env["PACKMULE_TUBE"]
    wait_until(lambda: _counts(backends().queue.tube_stats(0, tube))[2:4] == (1, 1),
               timeout=30, what="job 3 buried and the aggregate parked")
    return run


def test_runs_lists_the_latest_first_with_filters(env: dict[str, str], workers: Workers,
                                                  tmp_path: Path) -> None:
    failed = _failed_run(env, workers, tmp_path, "bad")
    assert Counted("good").run(3) == 3
    done = Counted.find("good")
    assert done is not None

    listed = cli_json("runs")
    assert [row["run"] for row in listed] == [done.run, failed]
    assert all(set(row) == SUMMARY_KEYS and set(row["counts"]) == COUNT_KEYS for row in listed)
    good, bad = listed
    assert (good["runner"], good["name"], good["state"]) == ("fault_runners:Counted", "good", "done")
    assert good["counts"]["completed"] == good["counts"]["total"] > 0
    assert good["finished"] >= good["started"] and good["duration_seconds"] >= 0
    assert (bad["state"], bad["counts"]["failed"], bad["resumable"]) == ("failed", 1, True)

    assert [row["run"] for row in cli_json("runs", "--state", "failed")] == [failed]
    assert [row["run"] for row in cli_json("runs", "--runner", "Counted")] == [done.run]
    assert [row["run"] for row in cli_json("runs", "--runner", "fault_runners:Flaky")] == [failed]
    assert [row["run"] for row in cli_json("runs", "--limit", "1")] == [done.run]
    assert cli_json("runs", "--state", "cancelled") == []

    text = cli("runs").stdout.splitlines()
    assert text[0].split() == ["RUN", "RUNNER", "NAME", "STATE", "PROGRESS", "STARTED", "DURATION"]
    assert text[1].split()[:4] == [done.run, "fault_runners:Counted", "good", "done"]
    total = good["counts"]["total"]
    assert f"{total} / {total}" in text[1]
    assert text[2].split()[:4] == [failed, "fault_runners:Flaky", "bad", "failed"]
    assert "(1 failed)" in text[2]
    assert cli("runs", "--state", "lost").stdout.strip() == "no runs"


def test_show_gives_the_failure_and_the_failed_jobs_with_their_tracebacks(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    run = _failed_run(env, workers, tmp_path, "bad")
    shown = cli_json("show", "--run", run)
    assert set(shown) == SUMMARY_KEYS | {"value", "failure", "failed_jobs", "lost_jobs"}
    assert shown["state"] == "failed" and shown["value"] is None and shown["lost_jobs"] == []
    assert (shown["failure"]["job"], shown["failure"]["method"]) == (3, "maybe")
    assert "ValueError: job 2 is broken" in shown["failure"]["traceback"]
    [failed_job] = shown["failed_jobs"]
    assert set(failed_job) == {"job", "method", "at", "traceback", "state"}
    assert (failed_job["job"], failed_job["method"], failed_job["state"]) == (3, "maybe", "buried")
    assert "ValueError: job 2 is broken" in failed_job["traceback"]
    assert failed_job["at"] >= shown["started"]

    # By RUNNER NAME: a class path or a bare class name, the same run.
    assert cli_json("show", "fault_runners:Flaky", "bad")["run"] == run
    assert cli_json("show", "Flaky", "bad")["run"] == run

    text = cli("show", "--run", run).stdout
    assert f"state     failed (resumable: after the fix, packmule kick --run {run})" in text
    assert "failure   job 3 maybe()" in text and "failed jobs (1)" in text
    assert "  job 3 maybe() failed at " in text and "[buried]" in text
    assert text.count("ValueError: job 2 is broken") == 2  # the run's failure and its job's

    unknown = cli("show", "--run", "nosuchrun", code=1)
    assert "unknown run 'nosuchrun'" in unknown.stderr
    assert "no run of Flaky named 'other'" in cli("show", "Flaky", "other", code=1).stderr


def test_reading_needs_no_import_of_the_runner(env: dict[str, str], workers: Workers,
                                               tmp_path: Path) -> None:
    run = _failed_run(env, workers, tmp_path, "bad")
    bare = {key: value for key, value in {**os.environ, **env}.items() if key != "PYTHONPATH"}
    for args in (["show", "Flaky", "bad"], ["runs"], ["progress", "Flaky", "bad"]):
        done = subprocess.run([sys.executable, "-m", "packmule", *args], env=bare, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert run in done.stdout or "failed" in done.stdout
    version = subprocess.run([sys.executable, "-m", "packmule", "--version"], env=bare,
                             capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith("packmule, version ")


def test_the_failure_index_follows_a_kick_to_the_end(env: dict[str, str], workers: Workers,
                                                     tmp_path: Path) -> None:
    run = _failed_run(env, workers, tmp_path, "bad")
    [entry] = leftovers.failures(backends(), run)
    assert (entry.job, entry.method, entry.state) == (3, "maybe", "buried")
    assert "ValueError: job 2 is broken" in entry.traceback

    (tmp_path / "fixed").touch()
    assert cli_json("kick", "--run", run) == {"run": run, "kicked": [3]}
    wait_until(lambda: Flaky("bad").update_progress().state == "done", timeout=30,
               what="the kicked run to finish")
    [entry] = leftovers.failures(backends(), run)
    assert (entry.job, entry.state, entry.traceback) == (3, "done", "")
    shown = cli_json("show", "--run", run)
    assert (shown["state"], shown["value"], shown["failure"]) == ("done", 10, None)
    assert shown["counts"]["failed"] == 0
    assert cli("kick", "--run", run).stdout.strip() == f"run {run}: kicked 0 buried job(s)"


def test_progress_prints_counts_and_state_and_watches_to_the_end(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    run = _failed_run(env, workers, tmp_path, "bad")
    reading = cli_json("progress", "Flaky", "bad")
    assert set(reading) == {"run", "state"} | COUNT_KEYS
    assert (reading["run"], reading["state"], reading["failed"]) == (run, "failed", 1)
    expected = f"{reading['completed']} / {reading['total']} (1 failed) failed"
    assert cli("progress", "Flaky", "bad").stdout.strip() == expected
    assert cli("progress", "--run", run).stdout.strip() == expected
    # The old form, with --import, still works.
    assert cli("progress", "Flaky", "bad", "--import", "fault_runners").stdout.strip() == expected

    assert cli("progress", "Flaky", "nothing", code=1).stdout.strip() == "unknown run"
    assert cli_json("progress", "--run", "nosuchrun", code=1) == {
        "run": None, "state": "unknown", **dict.fromkeys(COUNT_KEYS, 0)}

    watched_run = Counted("watched").run_async(10, 0.1).run
    watched = cli("progress", "Counted", "watched", "--watch")
    assert watched.stdout.strip().splitlines()[-1] == "11 / 11 done"
    lines = cli("progress", "--run", watched_run, "--watch", "--json").stdout.splitlines()
    assert [json.loads(line)["state"] for line in lines] == ["done"]
    assert cli("progress", "Flaky", "bad", "--watch", code=1).stdout.strip() == expected


def test_cancel_by_name_or_id_then_nothing_changes(env: dict[str, str], workers: Workers) -> None:
    workers.start("runners", 1)
    run = Slow("long").run_async(50, 0.2).run
    wait_until(lambda: Slow("long").update_progress().completed > 0, timeout=20,
               what="the run to start")
    assert cli("cancel", "Slow", "long").stdout.strip() == f"run {run}: cancelled"
    assert Slow("long").update_progress().state == "cancelled"
    assert cli_json("cancel", "--run", run) == {"run": run, "cancelled": False,
                                                "state": "cancelled"}
    assert cli("cancel", "--run", run).stdout.strip() == f"run {run}: already cancelled, " \
                                                          "nothing changed"
    assert "give RUNNER [NAME] or --run ID" in cli("cancel", code=2).stderr


def test_purge_removes_jobs_and_memcached_keys_of_an_ended_run(
        env: dict[str, str], workers: Workers, tmp_path: Path) -> None:
    run = _failed_run(env, workers, tmp_path, "bad")
    keys = RunKeys(backends().settings.namespace, run)
    assert backends().store.get(keys.job(3)) is not None
    purged = cli_json("purge", "--run", run)
    assert {k: purged[k] for k in ("run", "state", "parked", "buried")} == {
        "run": run, "state": "failed", "parked": 1, "buried": 1}
    assert purged["keys"] > 10
    store = backends().store
    assert not store.get_many([keys.total, keys.sequence, keys.buried, keys.job(3),
                               keys.job(0), keys.aggregate(6), keys.aggregates(0)])
    stats = backends().queue.tube_stats(0, env["PACKMULE_TUBE"])
    assert not any(stats.get(f"current-jobs-{s}", 0) for s in ("ready", "delayed", "buried"))
    # Its record stays, with its counts.
    shown = cli_json("show", "--run", run)
    assert (shown["state"], shown["counts"]["failed"], shown["failed_jobs"]) == ("failed", 1, [])
    again = cli("purge", "--run", run).stdout.strip()
    assert again.startswith(f"run {run} (failed): removed 0 parked and 0 buried job(s), and ")

    running = Counted("long").run_async(50, 0.2).run
    assert "is still running: cancel it first" in cli("purge", "--run", running, code=1).stderr
    Counted("long").cancel()


def _counts(stats: dict[str, Any]) -> tuple[int, ...]:
    return tuple(stats.get(f"current-{name}", 0) for name in
                 ("jobs-ready", "jobs-reserved", "jobs-delayed", "jobs-buried", "watching"))


def test_tubes_count_jobs_by_state_per_server(env: dict[str, str], workers: Workers,
                                              tmp_path: Path) -> None:
    _failed_run(env, workers, tmp_path, "bad")
    tube = env["PACKMULE_TUBE"]
    server = backends().queue.names[0]
    # The run reads failed once job 3's failure is recorded; the job is buried and the
    # aggregate parked (delayed) just after.
    wait_until(lambda: _counts(backends().queue.tube_stats(0, tube)) == (0, 0, 1, 1, 2),
               timeout=30, what="job 3 buried, the aggregate parked, both workers watching")
    rows = [row for row in cli_json("tubes") if row["tube"] == tube]
    assert rows == [{"server": server, "tube": tube, "ready": 0, "reserved": 0, "delayed": 1,
                     "buried": 1, "watching": 2}]
    lines = cli("tubes").stdout.splitlines()
    assert lines[0].split() == ["SERVER", "TUBE", "READY", "RESERVED", "DELAYED", "BURIED",
                                "WATCHING"]
    assert [server, tube, "0", "0", "1", "1", "2"] in [line.split() for line in lines]
    kicked = cli_json("kick", "--tube", tube)
    assert kicked == [{"server": server, "tube": tube, "kicked": 1}]


@pytest.mark.timeout(120)
def test_show_draws_the_tree_of_aggregates(env: dict[str, str], workers: Workers) -> None:
    workers.start("fibonacci_runner", 2)
    FibonacciRunner("tree").run_async(5)
    wait_until(lambda: FibonacciRunner("tree").update_progress().state == "done", timeout=60,
               what="fib(5) to finish")
    shown = cli_json("show", "FibonacciRunner", "tree", "--aggregates")
    tree = shown["aggregates"]
    assert (tree["total"], tree["shown"]) == (7, 7)  # one add() per fib(n) with n >= 2
    [top] = tree["roots"]

    def walk(node: dict[str, Any], depth: int) -> list[tuple[int, dict[str, Any]]]:
        found = [(depth, node)]
        for child in node["children"]:
            found.extend(walk(child, depth + 1))
        return found

    nodes = walk(top, 0)
    assert len(nodes) == 7 and max(depth for depth, _ in nodes) == 3  # fib 5 > 4 > 3 > 2
    assert all((n["method"], n["jobs"], n["fired"], n["state"]) == ("add", 2, True, "done")
               for _, n in nodes)
    assert top["created_by"] == 1 and len(top["children"]) == 2
    text = cli("show", "FibonacciRunner", "tree", "--aggregates").stdout
    assert "aggregates (7 of 7)" in text
    assert f"  #{top['number']} add() over 2 job(s): done" in text


def test_workers_lists_the_live_workers_and_the_job_in_hand(env: dict[str, str],
                                                            workers: Workers) -> None:
    assert cli("workers").stdout.strip() == "no workers alive"
    env["PACKMULE_WORKER_TTL_SECONDS"] = "2"  # a heartbeat every 2/3 s
    procs = workers.start("fault_runners", 2)
    pids = sorted(proc.pid for proc in procs)
    wait_until(lambda: sorted(w["pid"] for w in cli_json("workers")) == pids, timeout=30,
               what="both workers registered")
    run = Counted("held").run_async(2, 3.0).run
    listed = wait_until(lambda: [w for w in cli_json("workers")
                                 if w["job"] and w["job"]["method"] == "echo"], timeout=30,
                        what="an echo() job in hand")
    assert isinstance(listed, list)
    busy = listed[0]
    assert set(busy) == {"id", "host", "pid", "tubes", "imports", "started", "job", "done",
                         "failed", "heartbeat"}
    assert (busy["tubes"], busy["imports"]) == ([env["PACKMULE_TUBE"]], ["fault_runners"])
    assert (busy["job"]["run"], busy["job"]["method"]) == (run, "echo")
    lines = cli("workers").stdout.splitlines()
    assert lines[0].split()[:3] == ["WORKER", "PID", "TUBES"]
    assert any(f"echo() of {run} for " in line for line in lines[1:])
    assert {line.split()[1] for line in lines[1:]} == {str(pid) for pid in pids}

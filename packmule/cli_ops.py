"""The operator's commands: runs, show, progress, kick, cancel, purge, tubes, workers, web.

Each reads or acts through :mod:`packmule.overview` (the dashboard does too)
and has ``--json``, whose form is stable and documented in
``docs/monitoring.md``. None needs ``--import``: a run's record names its
runner's class path. A run is given as ``RUNNER NAME`` (a class path
``module:QualName``, or a bare class name) for the latest started run of
that name, or as ``--run ID``.
"""

from __future__ import annotations

import functools
import importlib
import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click
from tqdm import tqdm

from packmule import overview
from packmule.backends import backends
from packmule.config import settings
from packmule.errors import PackmuleError, UnknownRun
from packmule.overview import RunDetail, RunSummary, format_duration, format_time
from packmule.runs import COUNTERS
from packmule.tree import AggregateNode

F = TypeVar("F", bound=Callable[..., Any])
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print JSON (see docs/monitoring.md) instead of text.")
run_option = click.option("--run", "run_id", default=None, metavar="ID", help="The run's id.")


def operating(command: F) -> F:
    """Turn packmule's errors into a one-line message and exit status 1, not a traceback."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PackmuleError as err:
            raise click.ClickException(str(err)) from err

    return wrapper  # type: ignore[return-value]


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _run_of(runner: str | None, name: str, run_id: str | None, module: str | None = None) -> str:
    """The run id given by ``--run``, or the latest started run of RUNNER NAME."""
    if run_id:
        return run_id
    if not runner:
        raise click.UsageError("give RUNNER [NAME] or --run ID")
    if module:  # the old form, `progress RUNNER NAME --import MODULE`: the class path from it
        sys.path.insert(0, os.getcwd())
        cls = getattr(importlib.import_module(module), runner, None)
        if cls is None:
            raise click.UsageError(f"module {module} has no class {runner}")
        runner = cls.class_path()
    return overview.run_id_of(backends(), runner, name)


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
                   .rstrip())


# Reading ----------------------------------------------------------------------------------------
@click.command()
@click.option("--state", "states", multiple=True, type=click.Choice(overview.STATES),
              help="Only runs in this state (repeatable).")
@click.option("--runner", default="", help="Only runs of this runner (class path or class name).")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000),
              help="At most this many runs, the latest started first.")
@json_option
@operating
def runs(states: tuple[str, ...], runner: str, limit: int, as_json: bool) -> None:
    """List recent runs: runner, name, id, state, progress, started, duration."""
    found = overview.list_runs(backends(), states=states, runner=runner, limit=limit)
    if as_json:
        _echo_json([summary.to_json() for summary in found])
        return
    if not found:
        click.echo("no runs")
        return
    _table(["RUN", "RUNNER", "NAME", "STATE", "PROGRESS", "STARTED", "DURATION"],
           [[s.run, s.runner, s.name, s.state, s.progress, format_time(s.started),
             format_duration(s.duration_seconds)] for s in found])


@click.command()
@click.argument("runner", required=False)
@click.argument("name", default="default")
@run_option
@click.option("--aggregates", is_flag=True, help="Show the run's tree of aggregates too.")
@json_option
@operating
def show(runner: str | None, name: str, run_id: str | None, aggregates: bool,
         as_json: bool) -> None:
    """Show one run: state, counts, value or failure, failed jobs with tracebacks, lost jobs."""
    shown = overview.detail(backends(), _run_of(runner, name, run_id), aggregates=aggregates)
    if as_json:
        _echo_json(shown.to_json())
        return
    for line in _detail_lines(shown):
        click.echo(line)


def _detail_lines(shown: RunDetail) -> Iterator[str]:
    s = shown.summary
    yield f"run       {s.run}"
    yield f"runner    {s.runner}"
    yield f"name      {s.name}"
    resumable = f" (resumable: after the fix, packmule kick --run {s.run})" if s.resumable else ""
    yield f"state     {s.state}{resumable}"
    yield f"progress  {s.progress}"
    yield f"started   {format_time(s.started)}"
    took = format_duration(s.duration_seconds)
    yield f"finished  {format_time(s.finished)} ({took})" if s.finished else f"running   {took}"
    if s.state == "done":
        yield f"value     {json.dumps(shown.value)}"
    if shown.failure is not None:
        job = shown.failure["job"]
        who = "memcached lost state" if job is None else f"job {job} {shown.failure['method']}()"
        yield f"failure   {who}"
        yield from _indented(shown.failure["traceback"], 2)
    if shown.failed_jobs:
        yield f"failed jobs ({len(shown.failed_jobs)})"
        for failed in shown.failed_jobs:
            yield f"  job {failed.job} {failed.method}() failed at {format_time(failed.at)} " \
                  f"[{failed.state}]"
            yield from _indented(failed.traceback, 4)
    if shown.lost_jobs:
        yield f"lost jobs {', '.join(map(str, shown.lost_jobs))}"
    if shown.aggregates is not None:
        tree = shown.aggregates
        yield f"aggregates ({tree.shown} of {tree.total})"
        yield from _tree_lines(tree.roots)


def _indented(text: str, spaces: int) -> Iterator[str]:
    for line in text.rstrip().splitlines():
        yield " " * spaces + line


def _tree_lines(roots: list[AggregateNode]) -> Iterator[str]:
    """One line per aggregate, indented by depth (a stack, not recursion: trees may be deep)."""
    pending = [(node, 1) for node in reversed(roots)]
    while pending:
        node, depth = pending.pop()
        yield f"{'  ' * depth}#{node.number} {node.method}() over {node.jobs} job(s): {node.state}"
        pending.extend((child, depth + 1) for child in reversed(node.children))


@click.command()
@click.argument("runner", required=False)
@click.argument("name", default="default")
@run_option
@click.option("--import", "module", default=None, metavar="MODULE",
              help="Not needed: read RUNNER's class path from MODULE (the old form).")
@click.option("--watch", is_flag=True, help="Draw a live bar until the run ends.")
@json_option
@operating
def progress(runner: str | None, name: str, run_id: str | None, module: str | None,
             watch: bool, as_json: bool) -> None:
    """Print a run's progress and state: "53 / 101 running", or "unknown run".

    Exits 1 for an unknown run; with --watch, 0 once the run is done and 1
    if it ended otherwise (failed, lost, cancelled).
    """
    try:
        run: str | None = _run_of(runner, name, run_id, module)
    except UnknownRun:
        run = None
    summary = overview.progress(backends(), run)
    if summary is not None and watch:
        summary = _watch(run or "", summary, as_json)
    if as_json and watch:  # JSON lines while watching, the last one too
        click.echo(json.dumps(_progress_json(summary)))
    elif as_json:
        _echo_json(_progress_json(summary))
    else:
        click.echo("unknown run" if summary is None else f"{summary.progress} {summary.state}")
    if summary is None or (watch and summary.state != "done"):
        sys.exit(1)


def _progress_json(summary: RunSummary | None) -> dict[str, Any]:
    if summary is None:
        return {"run": None, "state": "unknown", **dict.fromkeys(COUNTERS, 0)}
    return {"run": summary.run, "state": summary.state, **summary.counts}


def _watch(run: str, summary: RunSummary, as_json: bool) -> RunSummary:
    """Redraw a bar (or print a JSON line) each half second until the run ends; its last summary."""
    with tqdm(total=summary.counts["total"], unit="job", disable=as_json) as bar:
        while True:
            bar.total = summary.counts["total"]
            bar.n = summary.counts["completed"] + summary.counts["failed"]
            bar.set_postfix_str(summary.state, refresh=True)
            if summary.state != "running":
                return summary
            if as_json:
                click.echo(json.dumps(_progress_json(summary)))
            time.sleep(0.5)  # a display's refresh rate, not a wait for an event
            summary = overview.progress(backends(), run) or summary


@click.command()
@json_option
@operating
def tubes(as_json: bool) -> None:
    """Jobs per tube and server: ready, reserved, delayed (parked aggregates too), buried."""
    found = overview.tubes(backends())
    if as_json:
        _echo_json([tube.to_json() for tube in found])
        return
    _table(["SERVER", "TUBE", "READY", "RESERVED", "DELAYED", "BURIED", "WATCHING"],
           [[t.server, t.tube, str(t.ready), str(t.reserved), str(t.delayed), str(t.buried),
             str(t.watching)] for t in found])


@click.command()
@json_option
@operating
def workers(as_json: bool) -> None:
    """Live workers: host, pid, tubes, the job in hand, jobs done and failed, last heartbeat."""
    found = overview.workers(backends())
    if as_json:
        _echo_json([overview.worker_json(info) for info in found])
        return
    if not found:
        click.echo("no workers alive")
        return
    now = time.time()
    _table(["WORKER", "PID", "TUBES", "JOB IN HAND", "DONE", "FAILED", "STARTED", "HEARTBEAT"],
           [[w.id, str(w.pid), ",".join(w.tubes), _in_hand(w.job, now), str(w.done),
             str(w.failed), format_time(w.started), f"{format_duration(now - w.heartbeat)} ago"]
            for w in found])


def _in_hand(job: dict[str, Any] | None, now: float) -> str:
    if job is None:
        return "idle"
    return f"job {job['job']} {job['method']}() of {job['run']} for " \
           f"{format_duration(now - job['since'])}"


# Acting -----------------------------------------------------------------------------------------
@click.command()
@run_option
@click.option("--tube", default=None, help="Kick a whole tube (default: the configured one).")
@click.option("--limit", default=1000, show_default=True, help="At most this many jobs per server.")
@json_option
@operating
def kick(run_id: str | None, tube: str | None, limit: int, as_json: bool) -> None:
    """Kick buried jobs back to ready: one run's (--run), or a tube's (never delayed aggregates)."""
    if run_id is not None:
        kicked = overview.kick(backends(), run_id)
        if as_json:
            _echo_json({"run": run_id, "kicked": kicked})
        else:
            click.echo(f"run {run_id}: kicked {len(kicked)} buried job(s)")
        return
    queue, tube = backends().queue, tube or settings().tube
    counted = [{"server": name, "tube": tube, "kicked": len(queue.kick_buried(index, tube, limit))}
               for index, name in enumerate(queue.names)]
    if as_json:
        _echo_json(counted)
        return
    for row in counted:
        click.echo(f"{row['server']}: kicked {row['kicked']} buried job(s)")


@click.command()
@click.argument("runner", required=False)
@click.argument("name", default="default")
@run_option
@json_option
@operating
def cancel(runner: str | None, name: str, run_id: str | None, as_json: bool) -> None:
    """Cancel a running run: workers drop its jobs, its aggregates never fire."""
    run = _run_of(runner, name, run_id)
    cancelled = overview.cancel(backends(), run)
    state = overview.progress(backends(), run)
    now = state.state if state is not None else "unknown"
    if as_json:
        _echo_json({"run": run, "cancelled": cancelled, "state": now})
    elif cancelled:
        click.echo(f"run {run}: cancelled")
    else:
        click.echo(f"run {run}: already {now}, nothing changed")


@click.command()
@click.option("--run", "run_id", required=True, metavar="ID", help="The ended run to clean up.")
@json_option
@operating
def purge(run_id: str, as_json: bool) -> None:
    """Remove what an ended run left: parked and buried jobs in beanstalkd, its memcached keys.

    A failed run keeps them so a kick can resume it; purge it once you give
    up on it. Its record in etcd stays until it expires (result_ttl_seconds).
    """
    purged = overview.purge(backends(), run_id)
    if as_json:
        _echo_json(purged.to_json())
        return
    click.echo(f"run {run_id} ({purged.state}): removed {purged.parked} parked and "
               f"{purged.buried} buried job(s), and {purged.keys} memcached key(s)")


# The dashboard -----------------------------------------------------------------------------------
@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; beyond loopback, PACKMULE_WEB_TOKEN must be set.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
def web(host: str, port: int) -> None:
    """Serve the dashboard: runs, one run (kick, cancel), workers, tubes, /metrics."""
    try:
        from packmule.web.app import serve
    except ImportError as err:
        raise click.ClickException(f"the dashboard needs the web extra: pip install "
                                   f"'packmule[web]' ({err})") from err
    configured = settings().web_token
    token = configured.values[0] if configured else ""
    if not token and not is_loopback(host):
        raise click.ClickException(f"listening on {host} (beyond loopback) needs a token: set "
                                   "PACKMULE_WEB_TOKEN (any long random string)")
    serve(host, port, token=token)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost`` included)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


COMMANDS = [runs, show, progress, tubes, workers, kick, cancel, purge, web]

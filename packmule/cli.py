"""The ``packmule`` command: workers, local servers, the demo, kick, progress."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
from tqdm import tqdm

from packmule import leftovers, logs, runs
from packmule.backends import backends
from packmule.config import configure, settings


@click.group()
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--log-format", default="text", show_default=True, type=click.Choice(logs.FORMATS),
              help="text lines, or one JSON object a line (for log shippers).")
def main(log_level: str, log_format: str) -> None:
    """packmule: run long work as many small background jobs."""
    logs.setup(log_level, log_format)


@main.command()
@click.option("--import", "imports", multiple=True, required=True, metavar="MODULE",
              help="Module defining runners; the only modules jobs may name.")
@click.option("--tube", "tubes", multiple=True, help="Tube to watch (repeatable).")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Worker processes, each restarted if it dies.")
@click.option("--burst", is_flag=True, help="Exit once the tubes are empty.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None, metavar="PORT",
              help="Serve Prometheus metrics on PORT (child i of --concurrency on PORT + i).")
@click.option("--metrics-host", default="0.0.0.0", show_default=True,
              help="Address to serve metrics on.")
@click.pass_context
def worker(ctx: click.Context, imports: tuple[str, ...], tubes: tuple[str, ...],
           concurrency: int, burst: bool, metrics_port: int | None, metrics_host: str) -> None:
    """Reserve and run jobs until stopped (SIGTERM/SIGINT: finish the current job)."""
    sys.path.insert(0, os.getcwd())
    if concurrency > 1:
        from packmule.supervisor import supervise

        def argv_for(slot: int) -> list[str]:
            top = ctx.find_root().params
            argv = ["--log-level", top["log_level"], "--log-format", top["log_format"], "worker",
                    "--metrics-host", metrics_host]
            argv += [f"--import={module}" for module in imports]
            argv += [f"--tube={tube}" for tube in tubes] + (["--burst"] if burst else [])
            return argv + ([f"--metrics-port={metrics_port + slot}"] if metrics_port else [])

        sys.exit(supervise(argv_for, concurrency, burst=burst))
    from packmule.worker import Worker

    address = None if metrics_port is None else (metrics_host, metrics_port)
    single = Worker(imports=list(imports), tubes=list(tubes), burst=burst,
                    metrics_address=address)
    single.run()
    sys.exit(single.exit_code)


@main.command()
@click.option("--beanstalkd", default=1, show_default=True, help="beanstalkd servers.")
@click.option("--memcached", default=1, show_default=True, help="memcached servers.")
def servers(beanstalkd: int, memcached: int) -> None:
    """Start local beanstalkd, memcached and etcd until Ctrl-C; print their variables."""
    from packmule.servers import main_foreground

    main_foreground(beanstalkd, memcached)


@main.command()
@click.option("--run", "run_id", default=None, metavar="ID",
              help="Kick only this run's buried jobs (noted as they were buried).")
@click.option("--tube", default=None, help="Tube (default: the configured one).")
@click.option("--limit", default=1000, show_default=True, help="At most this many jobs per server.")
def kick(run_id: str | None, tube: str | None, limit: int) -> None:
    """Kick buried jobs back to ready, one by one (never the delayed aggregates)."""
    if run_id is not None:
        _known_run(run_id)
        kicked = leftovers.kick_buried(backends(), run_id)
        click.echo(f"run {run_id}: kicked {len(kicked)} buried job(s)")
        return
    queue = backends().queue
    for index, name in enumerate(queue.names):
        kicked_ids = queue.kick_buried(index, tube or settings().tube, limit)
        click.echo(f"{name}: kicked {len(kicked_ids)} buried job(s)")


@main.command()
@click.option("--run", "run_id", required=True, metavar="ID", help="The ended run to clean up.")
def purge(run_id: str) -> None:
    """Remove what an ended run left in beanstalkd: its parked aggregates and buried jobs.

    A failed run keeps them so a kick can resume it; purge it once you
    give up on it. Its memcached keys expire on their own (state_ttl_seconds).
    """
    record = _known_run(run_id)
    if record.state == "running":
        raise click.ClickException(f"run {run_id} is still running: cancel it first")
    parked, buried = leftovers.remove_all(backends(), run_id)
    click.echo(f"run {run_id} ({record.state}): removed {parked} parked and {buried} buried job(s)")


def _known_run(run_id: str) -> runs.RunRecord:
    """The record of run ``run_id``; a clear error if none is known."""
    record = runs.read_run(backends(), run_id)
    if record is None:
        raise click.ClickException(f"unknown run {run_id!r} (never started, or its record expired)")
    return record


@main.command()
@click.argument("runner")
@click.argument("name", default="default")
@click.option("--import", "module", required=True, help="Module defining RUNNER.")
def progress(runner: str, name: str, module: str) -> None:
    """Print the progress of the latest run of RUNNER (a class name) called NAME."""
    sys.path.insert(0, os.getcwd())
    cls = getattr(importlib.import_module(module), runner)
    click.echo(str(cls(name).update_progress()))


@main.command()
@click.option("--naps", default=200, show_default=True, help="Snoozes to run.")
@click.option("--workers", default=2, show_default=True, help="Worker processes.")
def demo(naps: int, workers: int) -> None:
    """Start local servers and workers, run SleepyRunner with a progress bar, stop all."""
    from packmule.servers import start_local_servers

    examples = Path(__file__).resolve().parent.parent / "examples"
    with start_local_servers() as local:
        os.environ.update(local.env())
        configure(beanstalkd=local.env()["PACKMULE_BEANSTALKD"],
                  memcached=local.env()["PACKMULE_MEMCACHED"], etcd=local.env()["PACKMULE_ETCD"])
        env = {**os.environ, "PYTHONPATH": str(examples)}
        procs = [subprocess.Popen([sys.executable, "-m", "packmule", "--log-level", "WARNING",
                                   "worker", "--import", "sleepy_runner"], env=env)
                 for _ in range(workers)]
        try:
            click.echo(f"servers: {local.env()}")
            _run_demo(examples, naps)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _run_demo(examples: Path, naps: int) -> None:
    sys.path.insert(0, str(examples))
    from sleepy_runner import SleepyRunner

    runner = SleepyRunner("demo")
    started = time.monotonic()
    runner.run_async(naps, 0.05)
    with tqdm(total=naps + 1, unit="job") as bar:
        while True:
            progress = runner.update_progress()
            bar.total = max(progress.total, naps + 1)
            bar.n = progress.completed
            bar.refresh()
            if progress.finished:
                break
            time.sleep(0.1)  # a display refresh rate, not a wait for completion
    click.echo(f"slept {runner.get_return_value()} s in total over {naps} jobs, "
               f"in {time.monotonic() - started:.2f} s of wall time")

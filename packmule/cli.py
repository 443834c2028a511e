"""The ``packmule`` command: workers, local servers, the demo; the operator's commands.

The commands that read and steer runs (runs, show, progress, kick, cancel,
purge, tubes, workers, web) live in :mod:`packmule.cli_ops`.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
from tqdm import tqdm

from packmule import cli_ops, logs
from packmule.config import configure, settings
from packmule.errors import ConfigurationError


@click.group()
@click.version_option(package_name="packmule", prog_name="packmule")
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
    try:  # a setting out of range: one line naming it (and no child started to fail alike)
        settings()
    except ConfigurationError as err:
        raise click.ClickException(str(err)) from err
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
@click.option("--naps", default=200, show_default=True, help="Snoozes to run.")
@click.option("--workers", default=2, show_default=True, help="Worker processes.")
@click.option("--web", "web_port", type=int, default=None, is_flag=False, flag_value=8080,
              metavar="PORT", help="Serve the dashboard on PORT too (8080 if not given) and "
              "keep everything up until Ctrl-C.")
def demo(naps: int, workers: int, web_port: int | None) -> None:
    """Start local servers and workers, run SleepyRunner with a progress bar, stop all."""
    from packmule.servers import start_local_servers

    examples = Path(__file__).resolve().parent.parent / "examples"
    with start_local_servers() as local:
        # A fresh signing secret, shared with the demo's workers: jobs are signed, as they
        # should be in production (README "Security").
        os.environ.update(local.env(), PACKMULE_SECRET=secrets.token_hex(32))
        configure(beanstalkd=local.env()["PACKMULE_BEANSTALKD"],
                  memcached=local.env()["PACKMULE_MEMCACHED"], etcd=local.env()["PACKMULE_ETCD"],
                  secret=os.environ["PACKMULE_SECRET"])
        env = {**os.environ, "PYTHONPATH": str(examples)}
        procs = [subprocess.Popen([sys.executable, "-m", "packmule", "--log-level", "WARNING",
                                   "worker", "--import", "sleepy_runner"], env=env)
                 for _ in range(workers)]
        if web_port is not None:
            procs.append(subprocess.Popen([sys.executable, "-m", "packmule", "web", "--port",
                                           str(web_port)], env=env))
        try:
            click.echo(f"servers: {local.env()}")
            _run_demo(examples, naps)
            _offer_dashboard(web_port)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _offer_dashboard(web_port: int | None) -> None:
    """Say where the dashboard is (and wait for Ctrl-C), or how to start the demo with it."""
    if web_port is None:
        click.echo(f"to see the run in the dashboard: {_self_command()} demo --web  (servers, "
                   "workers and the dashboard at http://127.0.0.1:8080/ stay up until Ctrl-C)")
        return
    click.echo(f"dashboard: http://127.0.0.1:{web_port}/  (Ctrl-C stops the demo)")
    try:
        while True:
            time.sleep(3600)  # everything runs in the child processes until Ctrl-C
    except KeyboardInterrupt:
        click.echo("stopping")


def _self_command() -> str:
    """How this command was started, as a line to copy: ``.venv/bin/packmule`` or ``packmule``."""
    path = Path(sys.argv[0])
    if path.name != "packmule":
        return "packmule"
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


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


for _command in cli_ops.COMMANDS:
    main.add_command(_command)

"""The ``packmule`` command: workers, local servers, the demo; the operator's commands.

The commands that read and steer runs (runs, show, progress, kick, cancel,
purge, tubes, workers, web) live in :mod:`packmule.cli_ops`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
from tqdm import tqdm

from packmule import cli_ops
from packmule.config import configure


@click.group()
@click.version_option(package_name="packmule", prog_name="packmule")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def main(log_level: str) -> None:
    """packmule: run long work as many small background jobs."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@main.command()
@click.option("--import", "imports", multiple=True, required=True, metavar="MODULE",
              help="Module defining runners; the only modules jobs may name.")
@click.option("--tube", "tubes", multiple=True, help="Tube to watch (repeatable).")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Worker processes.")
@click.option("--burst", is_flag=True, help="Exit once the tubes are empty.")
def worker(imports: tuple[str, ...], tubes: tuple[str, ...], concurrency: int,
           burst: bool) -> None:
    """Reserve and run jobs until stopped (SIGTERM/SIGINT: finish the current job)."""
    sys.path.insert(0, os.getcwd())
    if concurrency > 1:
        sys.exit(_supervise(concurrency))
    from packmule.worker import Worker

    Worker(imports=list(imports), tubes=list(tubes), burst=burst).run()


def _supervise(concurrency: int) -> int:
    """Run ``concurrency`` single workers as child processes; forward stop signals."""
    argv = sys.argv[1:]
    if "--concurrency" in argv:  # drop the option and its value, by position
        position = argv.index("--concurrency")
        argv = argv[:position] + argv[position + 2:]
    argv = [a for a in argv if not a.startswith("--concurrency=")]
    # Own sessions: a terminal's Ctrl-C reaches only this parent, which forwards
    # one signal; a child seeing two (terminal and parent) would exit mid-job.
    children = [subprocess.Popen([sys.executable, "-m", "packmule", *argv],
                                 start_new_session=True)
                for _ in range(concurrency)]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)


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
        os.environ.update(local.env())
        configure(beanstalkd=local.env()["PACKMULE_BEANSTALKD"],
                  memcached=local.env()["PACKMULE_MEMCACHED"], etcd=local.env()["PACKMULE_ETCD"])
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

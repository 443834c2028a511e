"""Fixtures: real servers started once per session, real worker processes per test.

Each test gets its own namespace and tube, so tests share the servers but
never each other's jobs or keys.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import packmule
from packmule import config
from packmule.servers import LocalServers, start_local_servers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
PYTHONPATH = os.pathsep.join([str(ROOT / "tests"), str(ROOT / "examples"), str(ROOT)])


@pytest.fixture(scope="session")
def servers() -> Iterator[LocalServers]:
    """beanstalkd (with binlog), memcached (-M) and etcd on free loopback ports."""
    with start_local_servers() as local:
        yield local


@contextmanager
def isolated_settings(local: LocalServers) -> Iterator[dict[str, str]]:
    """Settings for one test on ``local``'s servers: a fresh namespace and tube.

    Yields the variables a worker process needs (``PACKMULE_*``, ``PYTHONPATH``).
    """
    namespace = f"t{uuid.uuid4().hex[:10]}"
    variables = {**local.env(), "PACKMULE_NAMESPACE": namespace}
    with environment(variables):
        packmule.configure(tube=namespace, health_check_seconds=(0.1, 0.5),
                           retry_base_seconds=0.2, retry_max_seconds=1.0)
        yield {**variables, "PACKMULE_TUBE": namespace, "PYTHONPATH": PYTHONPATH}


@contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """``variables`` in this process's environment, settings read afresh; all restored after."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    config.reset()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        config.reset()


@pytest.fixture
def env(servers: LocalServers) -> Iterator[dict[str, str]]:
    """Settings for one test: the session's servers, a fresh namespace and tube."""
    with isolated_settings(servers) as variables:
        yield variables


class Workers:
    """Worker processes started through the real CLI, stopped by pid."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, module: str, count: int = 1, *extra: str) -> list[subprocess.Popen[bytes]]:
        started = [
            subprocess.Popen(
                [sys.executable, "-m", "packmule", "--log-level", "WARNING", "worker",
                 "--import", module, "--tube", self.env["PACKMULE_TUBE"], *extra],
                env={**os.environ, **self.env}, cwd=ROOT,
            )
            for _ in range(count)
        ]
        self.procs.extend(started)
        return started

    def kill9(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=10)


@pytest.fixture
def workers(env: dict[str, str]) -> Iterator[Workers]:
    """Start workers with ``workers.start(module, count)``; all are killed at the end."""
    pool = Workers(env)
    yield pool
    pool.stop()


def in_thread(call: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    """Run ``call`` in a daemon thread; the dict gets its ``value`` or its ``error``."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # handed to the test thread
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def wait_until(condition: Callable[[], object], *, timeout: float = 30.0,
               what: str = "condition") -> object:
    """Poll ``condition`` until it is truthy, or fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")

"""Start and stop real local beanstalkd, memcached and etcd servers.

Tests, the demo and the benchmarks run against real servers, never mocks, so
this module starts each on a free loopback port in a temporary folder, waits
until it really serves, and stops it by process id. A missing binary is an
error naming the Debian package to install: a test must never skip silently.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from packmule.errors import ServerStartError

HOST = "127.0.0.1"
_PACKAGES = {"beanstalkd": "beanstalkd", "memcached": "memcached", "etcd": "etcd-server"}
# etcd elects itself and syncs its first write to disk before /health says true.
_DEADLINES = {"beanstalkd": 10.0, "memcached": 10.0, "etcd": 30.0}
_PORT_TRIES = 3
_STOP_SECONDS = 3.0
# beanstalkd's "pid: N" and memcached's "STAT pid N" in their `stats` replies.
_PID_LINE = re.compile(rb"(?:^|\n)(?:STAT )?pid:? (\d+)\r?\n")


@dataclass
class _Server:
    """One server process; its folder holds its log and its data."""

    kind: str
    folder: Path
    port: int = 0
    peer_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_offset: int = 0
    memory_mb: int = 64  # memcached's -m

    @property
    def log(self) -> Path:
        return self.folder / "server.log"  # appended to across restarts

    def describe(self) -> str:
        return f"{self.kind} on {HOST}:{self.port}"


class LocalServers:
    """A running set of local servers; a context manager that stops them.

    Create it with :func:`start_local_servers`. The URL lists keep their ports
    for the life of the object: the restart helpers reuse the same port.
    """

    def __init__(self, *, beanstalkd: int, memcached: int, workdir: Path | None,
                 memcached_mb: int = 64) -> None:
        if beanstalkd < 1 or memcached < 1:
            raise ValueError("each pool needs at least one server")
        self._owns_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="packmule-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        home = self.workdir
        self._etcd = _Server("etcd", home / "etcd")
        self._beanstalkd = [_Server("beanstalkd", home / f"beanstalkd-{i}") for i in range(beanstalkd)]
        self._memcached = [_Server("memcached", home / f"memcached-{i}", memory_mb=memcached_mb)
                           for i in range(memcached)]
        self._stopped = False

    @property
    def beanstalkd_urls(self) -> list[str]:
        return [f"beanstalk://{HOST}:{s.port}" for s in self._beanstalkd]

    @property
    def memcached_urls(self) -> list[str]:
        return [f"memcached://{HOST}:{s.port}" for s in self._memcached]

    @property
    def etcd_urls(self) -> list[str]:
        return [f"etcd://{HOST}:{self._etcd.port}"]

    def env(self) -> dict[str, str]:
        """The ``PACKMULE_*`` variables a worker or demo needs to find these servers."""
        return {
            "PACKMULE_BEANSTALKD": ",".join(self.beanstalkd_urls),
            "PACKMULE_MEMCACHED": ",".join(self.memcached_urls),
            "PACKMULE_ETCD": ",".join(self.etcd_urls),
        }

    def __enter__(self) -> LocalServers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every server: SIGTERM, then SIGKILL after ~3 s; safe to call twice.

        The work folder is removed only if this object created it, so a
        caller's ``workdir`` (and the logs in it) survive for inspection.
        """
        if self._stopped:
            return
        self._stopped = True
        _terminate([self._etcd, *self._beanstalkd, *self._memcached])
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def restart_beanstalkd(self, index: int = 0) -> None:
        """Crash beanstalkd ``index`` (SIGKILL) and start it on the same port and binlog.

        Jobs put before the crash are replayed from the binlog (beanstalkd
        writes it before answering ``put``; the page cache survives SIGKILL).
        Returns once the new process serves.
        """
        self._restart(self._beanstalkd[index])

    def restart_memcached(self, index: int = 0) -> None:
        """Crash memcached ``index`` (SIGKILL) and start it empty on the same port.

        This is how tests lose every counter and value that server held.
        SIGKILL, not SIGTERM: memcached 1.6 notices SIGTERM only on its
        once-a-second clock tick, so a polite restart costs up to 1 s.
        """
        self._restart(self._memcached[index])

    def _start_all(self) -> None:
        # etcd is the slowest to become healthy: launch it first, wait for it last.
        servers = [self._etcd, *self._beanstalkd, *self._memcached]
        for server in servers:
            _launch(server, new_ports=True)
        for server in [*servers[1:], self._etcd]:
            _finish(server, new_ports=True)

    def _restart(self, server: _Server) -> None:
        if self._stopped:
            raise ServerStartError(f"{server.describe()}: the servers were stopped")
        _terminate([server], signal.SIGKILL)
        _launch(server, new_ports=False)
        _finish(server, new_ports=False)


def start_local_servers(
    *, beanstalkd: int = 1, memcached: int = 1, workdir: Path | None = None,
    memcached_mb: int = 64,
) -> LocalServers:
    """Start ``beanstalkd`` + ``memcached`` servers and one etcd, all ready.

    Args:
        beanstalkd: how many beanstalkd servers (a pool), at least 1.
        memcached: how many memcached servers (a pool), at least 1.
        workdir: folder for data and logs; a temporary one (removed by
            ``stop()``) when None. A reused folder replays old binlogs.
        memcached_mb: each memcached's memory (``-m``); full, it refuses
            writes (``-M``). The benchmarks keep hundreds of thousands of values.

    Raises:
        ServerStartError: a binary is missing (names the Debian package), or a
            server exited or was not ready in time (with its log's tail).
            Servers already started are stopped first.
    """
    servers = LocalServers(beanstalkd=beanstalkd, memcached=memcached, workdir=workdir,
                           memcached_mb=memcached_mb)
    try:
        servers._start_all()
    except BaseException:
        servers.stop()
        raise
    return servers


def main_foreground(beanstalkd: int, memcached: int) -> None:
    """Run servers until SIGINT or SIGTERM, printing ``export`` lines for a shell.

    The handlers are set before the servers start and only set a flag, so a
    signal that arrives during start-up still stops every server cleanly.
    Must run in the main thread (Python delivers signals only there).
    """
    stop = threading.Event()
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    old = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in stop_signals}
    try:
        with start_local_servers(beanstalkd=beanstalkd, memcached=memcached) as servers:
            for name, value in servers.env().items():
                print(f"export {name}={shlex.quote(value)}", flush=True)
            print(f"# logs in {servers.workdir}; Ctrl-C to stop", file=sys.stderr, flush=True)
            stop.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _free_port() -> int:
    # Racy by nature (the port is free only now): _finish retries on another.
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _binary(kind: str) -> str:
    path = shutil.which(kind) or shutil.which(kind, path="/usr/bin:/usr/sbin")
    if path is None:
        package = _PACKAGES[kind]
        raise ServerStartError(f"{kind} not found: install the Debian package {package!r}")
    return path


def _argv(server: _Server) -> list[str]:
    port, folder = str(server.port), server.folder
    if server.kind == "beanstalkd":
        (folder / "binlog").mkdir(exist_ok=True)
        return [_binary("beanstalkd"), "-l", HOST, "-p", port,
                "-b", str(folder / "binlog"), "-z", "65535"]  # fmt: skip
    if server.kind == "memcached":
        # -M: refuse writes when full instead of evicting; as root it must be told a user.
        user = ["-u", "root"] if os.geteuid() == 0 else []
        return [_binary("memcached"), "-l", HOST, "-p", port, "-U", "0", "-M",
                "-m", str(server.memory_mb), *user]
    client, peer = f"http://{HOST}:{port}", f"http://{HOST}:{server.peer_port}"
    return [
        _binary("etcd"), "--name", "default", "--data-dir", str(folder / "data"),
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"default={peer}",
        "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1h",
        # One member on loopback: short raft ticks make it leader in ~0.1 s, not ~1 s.
        "--heartbeat-interval", "10", "--election-timeout", "100",
        "--logger", "zap", "--log-level", "error",
    ]  # fmt: skip


def _launch(server: _Server, *, new_ports: bool) -> None:
    if new_ports:
        server.port = _free_port()
        server.peer_port = _free_port() if server.kind == "etcd" else 0
    server.folder.mkdir(parents=True, exist_ok=True)
    argv = _argv(server)
    server.log_offset = server.log.stat().st_size if server.log.exists() else 0
    # ETCD_* variables would silently add settings; a new session keeps the
    # terminal's Ctrl-C from reaching the servers before we stop them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    with server.log.open("ab") as log:
        server.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )  # fmt: skip


def _finish(server: _Server, *, new_ports: bool) -> None:
    """Wait for a launched server; launch it again if its port was taken."""
    for attempt in range(1, _PORT_TRIES + 1):
        if _await(server):
            return
        if attempt == _PORT_TRIES:
            raise ServerStartError(f"{server.describe()}: port taken {attempt} times\n{_log_tail(server)}")
        if not new_ports:
            time.sleep(0.2)  # the same port: give whoever holds it a moment
        _launch(server, new_ports=new_ports)


def _await(server: _Server) -> bool:
    """True when ready, False when it exited because its port was in use."""
    assert server.process is not None
    deadline = time.monotonic() + _DEADLINES[server.kind]
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = _log_tail(server)
            if "address already in use" in tail.lower():
                return False
            raise ServerStartError(f"{server.describe()} exited with {server.process.returncode}\n{tail}")
        if _etcd_healthy(server.port) if server.kind == "etcd" else _serves_pid(server):
            return True
        time.sleep(0.01)
    _terminate([server])
    raise ServerStartError(
        f"{server.describe()} not ready after {_DEADLINES[server.kind]:.0f} s\n{_log_tail(server)}"
    )


def _serves_pid(server: _Server) -> bool:
    """True when the port answers ``stats`` with our process's pid, not just accepts.

    An accepted connection could be another program that won the port race.
    """
    assert server.process is not None
    try:
        with socket.create_connection((HOST, server.port), timeout=0.5) as sock:
            sock.sendall(b"stats\r\n")
            reply = b""
            while (found := _PID_LINE.search(reply)) is None and len(reply) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                reply += chunk
    except OSError:
        return False
    return found is not None and int(found.group(1)) == server.process.pid


def _etcd_healthy(port: int) -> bool:
    # No proxy: an http_proxy setting must not route loopback checks elsewhere.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{HOST}:{port}/health", timeout=1.0) as response:
            body = json.loads(response.read())
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and body.get("health") == "true"


def _log_tail(server: _Server, size: int = 2000) -> str:
    """The end of what the current process wrote to its log."""
    try:
        with server.log.open("rb") as log:
            log.seek(max(server.log_offset, log.seek(0, os.SEEK_END) - size))
            return log.read().decode(errors="replace").strip() or "(log is empty)"
    except OSError as err:
        return f"(no log: {err})"


def _terminate(servers: list[_Server], first: signal.Signals = signal.SIGTERM) -> None:
    """Send ``first`` to each by pid, SIGKILL what is left after ~3 s, and reap all."""
    running = [s.process for s in servers if s.process is not None]
    for process in running:
        if process.poll() is None:
            os.kill(process.pid, first)
    deadline = time.monotonic() + _STOP_SECONDS
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    for server in servers:
        server.process = None

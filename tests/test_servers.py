"""packmule.servers against the real binaries: start, serve, restart, stop.

One set of servers (so one etcd start) serves the module; the tests that
must stop servers or make a start fail start their own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import etcd3
import greenstalk
import pytest
from pymemcache.client.base import Client as Memcache

import packmule
from packmule import servers as servers_module
from packmule.errors import ServerStartError
from packmule.servers import LocalServers, start_local_servers


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def _children() -> set[int]:
    """Live (or unreaped) processes whose parent is this test process."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            found.add(int(stat.parent.name))
    return found


def _accepts(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=0.5).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def local() -> Iterator[LocalServers]:
    with start_local_servers(beanstalkd=2, memcached=2) as started:
        yield started


def test_urls_and_env_name_every_server(local: LocalServers) -> None:
    assert len(local.beanstalkd_urls) == 2 and len(local.memcached_urls) == 2
    assert len(local.etcd_urls) == 1
    urls = local.beanstalkd_urls + local.memcached_urls + local.etcd_urls
    assert len({_address(url) for url in urls}) == 5
    assert all(url.startswith("beanstalk://127.0.0.1:") for url in local.beanstalkd_urls)
    assert all(url.startswith("memcached://127.0.0.1:") for url in local.memcached_urls)
    assert local.etcd_urls[0].startswith("etcd://127.0.0.1:")
    assert local.env() == {
        "PACKMULE_BEANSTALKD": ",".join(local.beanstalkd_urls),
        "PACKMULE_MEMCACHED": ",".join(local.memcached_urls),
        "PACKMULE_ETCD": local.etcd_urls[0],
    }


@pytest.mark.parametrize("index", [0, 1])
def test_beanstalkd_puts_and_reserves(local: LocalServers, index: int) -> None:
    tube = f"t{uuid.uuid4().hex[:8]}"
    with greenstalk.Client(_address(local.beanstalkd_urls[index]), use=tube, watch=tube) as queue:
        queue.put("x" * 60_000)  # -z 65535 admits a job near the 64 KB limit
        job = queue.reserve(timeout=5)
        assert job.body == "x" * 60_000
        queue.delete(job)


@pytest.mark.parametrize("index", [0, 1])
def test_memcached_sets_and_gets(local: LocalServers, index: int) -> None:
    store = Memcache(_address(local.memcached_urls[index]), default_noreply=False)
    try:
        assert store.set(b"servers-test", b"value")
        assert store.get(b"servers-test") == b"value"
    finally:
        store.close()


def test_etcd_puts_and_gets(local: LocalServers) -> None:
    host, port = _address(local.etcd_urls[0])
    client = etcd3.client(host=host, port=port, timeout=5)
    try:
        client.put("/servers-test/key", "value")
        value, _ = client.get("/servers-test/key")
        assert value == b"value"
    finally:
        client.close()


def test_restart_beanstalkd_keeps_jobs_from_the_binlog(local: LocalServers) -> None:
    tube = f"t{uuid.uuid4().hex[:8]}"
    address = _address(local.beanstalkd_urls[1])
    with greenstalk.Client(address, use=tube, watch=tube) as queue:
        old_pid = queue.stats()["pid"]
        queue.put("survives")
    local.restart_beanstalkd(1)
    assert local.beanstalkd_urls[1] == f"beanstalk://{address[0]}:{address[1]}"
    with greenstalk.Client(address, use=tube, watch=tube) as queue:
        assert queue.stats()["pid"] != old_pid
        job = queue.reserve(timeout=5)
        assert job.body == "survives"
        queue.delete(job)


def test_restart_memcached_empties_it(local: LocalServers) -> None:
    address = _address(local.memcached_urls[0])
    store = Memcache(address, default_noreply=False)
    try:
        assert store.set(b"servers-lost", b"value")
        old_pid = store.stats()[b"pid"]
        local.restart_memcached(0)
        store.close()  # the old connection died with the old process
        assert store.stats()[b"pid"] != old_pid
        assert store.get(b"servers-lost") is None
        assert store.set(b"servers-lost", b"again")
    finally:
        store.close()
    assert local.memcached_urls[0] == f"memcached://{address[0]}:{address[1]}"


def test_stop_ends_every_process_and_is_idempotent(tmp_path: Path) -> None:
    before = _children()
    started = start_local_servers(workdir=tmp_path / "work")
    pids = _children() - before
    assert len(pids) == 3
    addresses = [_address(u) for u in started.beanstalkd_urls + started.memcached_urls]
    started.stop()
    started.stop()
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)  # gone and reaped
    assert not any(_accepts(address) for address in addresses)
    assert (tmp_path / "work" / "etcd").is_dir()  # a caller's workdir is kept


def test_own_temporary_folder_is_removed() -> None:
    with start_local_servers() as started:
        workdir = started.workdir
        assert workdir.is_dir()
    assert not workdir.exists()


def test_missing_binary_names_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _children()
    real_which = servers_module.shutil.which

    def which(name: str, *args: object, **kwargs: object) -> str | None:
        return None if name == "memcached" else real_which(name)

    monkeypatch.setattr(servers_module.shutil, "which", which)
    with pytest.raises(ServerStartError, match="Debian package 'memcached'"):
        start_local_servers()
    assert _children() - before == set()  # etcd and beanstalkd were stopped again


def test_a_taken_port_is_retried_then_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        monkeypatch.setattr(servers_module, "_free_port", lambda: taken)
        with pytest.raises(ServerStartError) as caught:
            start_local_servers()
    message = str(caught.value)
    assert "port taken 3 times" in message and "already in use" in message.lower()


def test_main_foreground_prints_exports_and_stops_on_sigterm() -> None:
    code = "from packmule.servers import main_foreground; main_foreground(1, 2)"
    root = str(Path(packmule.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root}
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    ) as process:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(3)]
        exports = dict(line.removeprefix("export ").strip().split("=", 1) for line in lines)
        assert sorted(exports) == ["PACKMULE_BEANSTALKD", "PACKMULE_ETCD", "PACKMULE_MEMCACHED"]
        addresses = [_address(url) for url in exports["PACKMULE_MEMCACHED"].split(",")]
        assert len(addresses) == 2 and all(_accepts(address) for address in addresses)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    # main_foreground reaps its servers before it returns, so no waiting here.
    assert not any(_accepts(address) for address in addresses)

"""The worker registry: which worker processes are alive, and what each is doing.

Each worker process keeps one record in etcd (``/<namespace>/workers/<id>``)
on a lease of its own, ``worker_ttl_seconds`` long. A heartbeat thread
refreshes the lease and rewrites the record every third of that TTL, with
the job in hand and the counts of jobs done and failed: the job loop only
assigns attributes, so etcd is never written once per job. A worker that
stops cleanly revokes its lease (its record goes at once); one that dies
(``kill -9``, a lost host) disappears when its lease expires, within
``worker_ttl_seconds``. A job shorter than a heartbeat may never show as
the job in hand: the record is a sample, not a log.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from packmule.backends import Backends
from packmule.config import Settings
from packmule.errors import ServerError

log = logging.getLogger("packmule.registry")

# What the heartbeat asks the worker for: (job in hand or None, done, failed).
Snapshot = Callable[[], tuple[dict[str, Any] | None, int, int]]


@dataclass(frozen=True)
class WorkerInfo:
    """One live worker process, as its last heartbeat wrote it.

    Attributes:
        id: ``host.pid.random``: unique even when a pid is reused.
        host: the host name.
        pid: the process id on that host.
        tubes: the tubes it watches.
        imports: the modules it may run runners from (``--import``).
        started: when it started (epoch seconds).
        job: the job in hand (``run``, ``job``, ``method``, ``since`` in epoch
            seconds), or None when idle at the last heartbeat.
        done: jobs it finished (a value recorded, or supplied by ``handle_error``).
        failed: jobs it failed for good (buried).
        heartbeat: when the record was written (epoch seconds).
    """

    id: str
    host: str
    pid: int
    tubes: list[str]
    imports: list[str]
    started: float
    job: dict[str, Any] | None
    done: int
    failed: int
    heartbeat: float


def workers_prefix(backends: Backends) -> str:
    """The prefix of every worker's record."""
    return f"{backends.coord.prefix}/workers/"


def list_workers(backends: Backends) -> list[WorkerInfo]:
    """The live workers, by host then pid (one etcd range read).

    A record that does not decode (another version of packmule) is skipped
    with a warning; unknown fields are ignored, so newer records still read.
    """
    known = {f.name for f in fields(WorkerInfo)}
    found = []
    for key, raw in backends.coord.get_prefix(workers_prefix(backends)).items():
        try:
            data = json.loads(raw)
            found.append(WorkerInfo(**{name: data[name] for name in known}))
        except (ValueError, TypeError, KeyError) as err:
            log.warning("worker record %s does not read: %r", key, err)
    return sorted(found, key=lambda info: (info.host, info.pid, info.id))


class Heartbeat:
    """Registers one worker process and keeps its record alive from a thread of its own.

    Its etcd client is its own (the job loop's are per thread). An etcd
    outage is logged and ridden out: the next beat registers again, on a new
    lease if the old one expired meanwhile.
    """

    def __init__(self, config: Settings, *, tubes: list[str], imports: list[str],
                 snapshot: Snapshot) -> None:
        host = socket.gethostname()
        self.info = WorkerInfo(f"{host}.{os.getpid()}.{secrets.token_hex(3)}", host,
                               os.getpid(), list(tubes), sorted(imports), time.time(), None,
                               0, 0, 0.0)
        self._settings = config
        self._snapshot = snapshot
        self._stop = threading.Event()
        self._lease = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="packmule-heartbeat")

    def start(self) -> None:
        """Register now (in the thread) and every third of ``worker_ttl_seconds`` after."""
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and remove the record at once (its lease is revoked)."""
        self._stop.set()
        self._thread.join(timeout=self._settings.socket_timeout_seconds + 1)

    def _run(self) -> None:
        backends = Backends(self._settings)
        interval = max(0.5, self._settings.worker_ttl_seconds / 3)
        try:
            while True:
                self._beat(backends)
                if self._stop.wait(interval):
                    break
            if self._lease:
                backends.coord.revoke_lease(self._lease)
        except ServerError as err:
            log.warning("worker %s: unregistering failed: %s", self.info.id, err)
        finally:
            backends.close()

    def _beat(self, backends: Backends) -> None:
        """Refresh the lease (a new one if it expired) and rewrite the record."""
        coord = backends.coord
        try:
            if not self._lease or not coord.refresh_lease(self._lease):
                self._lease = coord.grant_lease(self._settings.worker_ttl_seconds)
            coord.put(workers_prefix(backends) + self.info.id, self._record(), lease=self._lease)
        except ServerError as err:
            log.warning("worker %s: heartbeat failed: %s", self.info.id, err)

    def _record(self) -> bytes:
        job, done, failed = self._snapshot()
        data = asdict(self.info) | {"job": job, "done": done, "failed": failed,
                                    "heartbeat": time.time()}
        return json.dumps(data, separators=(",", ":")).encode()

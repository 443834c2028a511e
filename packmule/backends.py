"""The connections to beanstalkd, memcached and etcd, made once per thread.

Clients are not thread-safe and gRPC channels must not cross a fork, so
connections are cached per (process, thread): a Runner built many times in
a loop (``SleepyRunner("nightly").update_progress()``) reuses them, and a
forked child or a keep-alive thread makes its own.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from packmule import signing
from packmule.config import Settings, settings
from packmule.coord import Coordinator, Security
from packmule.queue import Queue
from packmule.signing import Signer
from packmule.store import Store


@dataclass
class Backends:
    """Lazily opened clients for one thread, for one set of settings."""

    settings: Settings
    # Sizes of closed batches seen by this thread (they never change once closed),
    # so a completion skips reading the batch record until the batch may be done.
    batch_sizes: dict[str, int] = field(default_factory=dict)
    # What a worker derives from a job head, by (head, --import list): its runner
    # class, checked, and its run's scope (packmule.execution.Kind), once per head.
    kinds: dict[tuple[Any, frozenset[str]], Any] = field(default_factory=dict)

    @cached_property
    def queue(self) -> Queue:
        """The beanstalkd pool (producer side)."""
        return Queue(self.settings.beanstalkd, timeout_seconds=self.settings.socket_timeout_seconds)

    @cached_property
    def store(self) -> Store:
        """The memcached pool."""
        return Store(self.settings.memcached, timeout_seconds=self.settings.socket_timeout_seconds,
                     ttl_seconds=self.settings.state_ttl_seconds)

    @cached_property
    def coord(self) -> Coordinator:
        """The etcd client."""
        return Coordinator(self.settings.etcd, namespace=self.settings.namespace,
                           timeout_seconds=self.settings.socket_timeout_seconds,
                           security=Security.of(self.settings))

    @cached_property
    def signer(self) -> Signer | None:
        """Signs the job bodies this thread makes; None when no secret is configured."""
        return signing.from_settings(self.settings)

    def close(self) -> None:
        """Close whatever was opened."""
        for name in ("queue", "store", "coord"):
            if name in self.__dict__:
                self.__dict__.pop(name).close()


_local = threading.local()
_process = [os.getpid()]  # this process's id, kept by a fork hook: getpid is a system call


def _forked() -> None:
    _process[0] = os.getpid()


os.register_at_fork(after_in_child=_forked)


def backends() -> Backends:
    """This thread's connections for the settings in force."""
    current, pid = settings(), _process[0]
    cached: Backends | None = getattr(_local, "backends", None)
    if cached is not None and cached.settings is current and _local.pid == pid:
        return cached  # the common case, per job and per enqueue: no settings compared
    if cached is None or cached.settings != current or getattr(_local, "pid", None) != pid:
        if cached is not None and getattr(_local, "pid", None) == pid:
            cached.close()
        cached = Backends(current)
        _local.backends, _local.pid = cached, pid
    return cached

"""packmule set-up for an application: copy to ``myapp/packmule_setup.py`` and adapt.

Call :func:`setup` once at start-up of every process that enqueues jobs or
reads results (web server, cron jobs, scripts), before the first runner is
used::

    from myapp.packmule_setup import setup
    setup()                        # or setup(django.conf.settings.PACKMULE)

Where the server addresses come from, first match wins:

1. the ``PACKMULE_BEANSTALKD``, ``PACKMULE_MEMCACHED``, ``PACKMULE_ETCD``
   (and ``PACKMULE_NAMESPACE``) environment variables, so operations can
   point one host elsewhere without a code change;
2. the application's own settings, passed to :func:`setup` as a mapping
   (``{"beanstalkd": "beanstalk://10.0.0.5:11300,beanstalk://10.0.0.6:11300",
   "memcached": "memcached://10.0.0.7:11211", "etcd": "etcd://10.0.0.8:2379",
   "namespace": "myapp", "max_retries": 5}``); any name
   ``packmule.configure`` accepts may appear there;
3. packmule's defaults (the servers on 127.0.0.1, their usual ports).

Workers (``packmule worker --import myapp.runners``) read the ``PACKMULE_*``
environment when they start, before they import your modules: give them
the addresses in their service unit (see ``packmule-worker.service``), not
through this module.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import packmule

# The modules that define your runners. Start workers with the same list
# (`packmule worker --import myapp.runners --import myapp.reports`): a worker
# runs jobs only of runner classes from the modules it was told to import.
RUNNER_MODULES: tuple[str, ...] = ("myapp.runners",)

# Server lists whose environment variable, when set, wins over the app's settings.
_ENVIRONMENT = {
    "beanstalkd": "PACKMULE_BEANSTALKD",
    "memcached": "PACKMULE_MEMCACHED",
    "etcd": "PACKMULE_ETCD",
    "namespace": "PACKMULE_NAMESPACE",
}

log = logging.getLogger("packmule.setup")


def setup(app_settings: Mapping[str, Any] | None = None, *, log_level: str = "INFO",
          import_runners: bool = True) -> packmule.Settings:
    """Configure logging and packmule for this process; returns the settings in force.

    Args:
        app_settings: packmule settings from the application's own
            configuration, by ``packmule.configure`` name. Entries whose
            ``PACKMULE_*`` variable is set in the environment are ignored.
        log_level: level of the ``packmule`` loggers.
        import_runners: import :data:`RUNNER_MODULES` now, so a typo or a
            broken import fails at start-up rather than at the first enqueue.

    Raises:
        packmule.ConfigurationError: a setting has a value packmule cannot
            use (the message names the setting and the value).
    """
    configure_logging(log_level)
    changes = {name: value for name, value in (app_settings or {}).items()
               if not os.environ.get(_ENVIRONMENT.get(name, ""))}
    # configure() with no change still reads and checks the environment.
    current = packmule.configure(**changes)
    log.info("packmule: beanstalkd %s, memcached %s, etcd %s, namespace %r",
             _addresses(current.beanstalkd), _addresses(current.memcached),
             _addresses(current.etcd), current.namespace)
    if import_runners:
        for module in RUNNER_MODULES:
            importlib.import_module(module)
    return current


def configure_logging(level: str = "INFO") -> None:
    """Send packmule's log lines somewhere visible without overriding the app's logging.

    If the application configured the root logger already (Django's LOGGING,
    ``logging.config.dictConfig``), its handlers are kept; otherwise a plain
    stderr handler is added. packmule logs under the ``packmule`` name:
    retries and buried jobs at WARNING and ERROR, worker start-up at INFO.
    """
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("packmule").setLevel(level)


def _addresses(addresses: tuple[tuple[str, int], ...]) -> str:
    return ",".join(f"{host}:{port}" for host, port in addresses)

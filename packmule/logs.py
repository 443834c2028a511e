"""Logging of the ``packmule`` command: lines for people, or JSON objects for log shippers.

Workers log one line per job at INFO (``packmule.worker``): its run, job,
method, runner, duration, outcome and attempt, which JSON output carries as
keys of their own (passed with ``extra=``), beside ``time``, ``level``,
``logger`` and ``message``.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

FORMATS = ("text", "json")
TEXT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def setup(level: str, log_format: str) -> None:
    """Send every log record at ``level`` or above to stderr, as text or as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s", timestamp=False,
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter(TEXT))
    logging.basicConfig(level=level, handlers=[handler], force=True)

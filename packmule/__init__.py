"""packmule: run long work as many small background jobs, and bring the pieces back.

Subclass :class:`Runner`, fan out with ``enqueue``, bring back with
``deferred_result``; ``run()`` blocks, ``run_async()`` returns at once and
``update_progress()`` can be polled from any process.
"""

from packmule.config import Settings, configure, settings
from packmule.errors import (
    ConfigurationError,
    CoordinatorUnavailable,
    DecodeError,
    EncodeError,
    EnqueueError,
    JobCancelled,
    JobTooBig,
    PackmuleError,
    QueueUnavailable,
    ResultError,
    ResultMissing,
    ResultPending,
    RunCancelled,
    RunFailed,
    ServerError,
    ServerRefused,
    ServerUnavailable,
    StoreUnavailable,
    UnknownMethod,
    UnknownRun,
)
from packmule.jobref import JobRef
from packmule.markers import MISSING, Failure
from packmule.multistep import MultiStepTask
from packmule.progress import Progress
from packmule.runner import Runner
from packmule.runs import RunRecord

__all__ = [
    "MISSING",
    "ConfigurationError",
    "CoordinatorUnavailable",
    "DecodeError",
    "EncodeError",
    "EnqueueError",
    "Failure",
    "JobCancelled",
    "JobRef",
    "JobTooBig",
    "MultiStepTask",
    "PackmuleError",
    "Progress",
    "QueueUnavailable",
    "ResultError",
    "ResultMissing",
    "ResultPending",
    "RunCancelled",
    "RunFailed",
    "RunRecord",
    "Runner",
    "ServerError",
    "ServerRefused",
    "ServerUnavailable",
    "Settings",
    "StoreUnavailable",
    "UnknownMethod",
    "UnknownRun",
    "configure",
    "settings",
]

"""The dashboard's ``/metrics``: queue depths per tube and server, runs by state (Prometheus).

Read when scraped, never cached: one ``list-tubes`` and one ``stats-tube``
per tube and server, and one etcd listing of the run records (O(runs kept),
a week's worth by default). Workers expose their own job metrics
(``packmule worker --metrics-port``).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from packmule import overview, runs
from packmule.backends import backends
from packmule.errors import PackmuleError

JOB_STATES = ("ready", "reserved", "delayed", "buried")


class DashboardCollector(Collector):
    """Gauges read from the servers at each scrape."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queue = GaugeMetricFamily(
            "packmule_queue_jobs", "Jobs in beanstalkd by server, tube and state "
            "(delayed includes parked aggregates, each waiting until it fires).",
            labels=["server", "tube", "state"])
        for tube in overview.tubes(backends()):
            for state in JOB_STATES:
                queue.add_metric([tube.server, tube.tube, state], getattr(tube, state))
        yield queue
        by_state = GaugeMetricFamily(
            "packmule_runs", "Runs whose record etcd keeps (result_ttl_seconds after their end), "
            "by state as recorded.", labels=["state"])
        counted = runs.count_states(backends())
        for state in overview.STATES:
            by_state.add_metric([state], counted.get(state, 0))
        yield by_state


REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(DashboardCollector())


async def endpoint(_request: Request) -> Response:
    """The Prometheus text format; 503 naming the server if one cannot be read."""
    try:
        body = await run_in_threadpool(generate_latest, REGISTRY)
    except PackmuleError as err:
        return PlainTextResponse(f"# {err}\n", 503)
    return Response(body, media_type=CONTENT_TYPE_LATEST)

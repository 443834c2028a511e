"""The dashboard's routes: pages, their live fragments, the actions, /metrics.

Every read goes through :mod:`packmule.overview` in a worker thread (the
clients are blocking, and each thread keeps its own connections). A page
is served whole once; its live part is a fragment URL the page polls.
A server that cannot be reached is said on the page, not a crash.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from packmule import overview
from packmule.backends import backends
from packmule.config import settings
from packmule.errors import PackmuleError, UnknownRun
from packmule.tree import read_tree
from packmule.web import metrics
from packmule.web.guard import COOKIE, Guard

HERE = Path(__file__).resolve().parent
log = logging.getLogger("packmule.web")
HEADERS = {  # no framing (clickjacking), no script or style from elsewhere
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
}
SAID = {"kicked": "kicked {n} buried job(s)", "cancelled": "cancelled",
        "not-cancelled": "not cancelled: it had already ended"}


def create_app(*, token: str = "") -> Starlette:
    """The dashboard application; ``token`` (if set) is asked of every request but the login.

    Without a token it answers only to loopback host names (see :mod:`packmule.web.guard`).
    """
    guard = Guard(token=token, loopback=not token)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(duration=overview.format_duration, time=overview.format_time,
                                 csrf=guard.csrf, states=overview.STATES)
    pages = Pages(templates, guard)
    routes = [
        Route("/", pages.runs), Route("/fragments/runs", pages.runs_rows),
        Route("/runs/{run}", pages.run), Route("/fragments/runs/{run}", pages.run_body),
        Route("/fragments/runs/{run}/tree", pages.run_tree),
        Route("/runs/{run}/kick", pages.kick, methods=["POST"]),
        Route("/runs/{run}/cancel", pages.cancel, methods=["POST"]),
        Route("/workers", pages.workers), Route("/fragments/workers", pages.workers_rows),
        Route("/tubes", pages.tubes), Route("/fragments/tubes", pages.tubes_rows),
        Route("/metrics", metrics.endpoint),
        Route("/login", pages.login, methods=["GET", "POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(BaseHTTPMiddleware,
                                                           dispatch=_guarding(guard))])


def _guarding(guard: Guard) -> Callable[[Request, Callable[[Request], Awaitable[Response]]],
                                        Awaitable[Response]]:
    async def dispatch(request: Request,
                       call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if not guard.host_allowed(request):
            return PlainTextResponse("this dashboard answers to loopback host names only", 400)
        public = request.url.path == "/login" or request.url.path.startswith("/static/")
        if not public and not guard.signed_in(request):
            if request.method == "GET" and not request.url.path.startswith(("/fragments", "/metrics")):
                return RedirectResponse("/login", 303)
            return PlainTextResponse("the dashboard's token is needed", 401)
        response = await call_next(request)
        response.headers.update(HEADERS)
        return response

    return dispatch


class Pages:
    """The handlers; each page and the fragment it polls share one template part."""

    def __init__(self, templates: Jinja2Templates, guard: Guard) -> None:
        self.templates = templates
        self.guard = guard

    def _render(self, request: Request, name: str, context: dict[str, Any],
                status: int = 200) -> Response:
        return self.templates.TemplateResponse(request, name, {
            "namespace": settings().namespace, "signed_out": not self.guard.token, **context},
            status_code=status)

    async def _read(self, request: Request, name: str, read: Callable[[], dict[str, Any]],
                    extra: dict[str, Any] | None = None) -> Response:
        """Render ``name`` with what ``read`` returns, in a thread; errors said on the page."""
        context = {"fragment": name.startswith("_"), **(extra or {})}
        try:
            context.update(await run_in_threadpool(read))
        except UnknownRun as err:
            return self._render(request, name, {**context, "error": str(err), "missing": True}, 404)
        except PackmuleError as err:
            log.warning("dashboard read failed: %s", err)
            return self._render(request, name, {**context, "error": str(err)}, 503)
        return self._render(request, name, context)

    # Runs -----------------------------------------------------------------------------------------
    def _runs_query(self, request: Request) -> dict[str, Any]:
        state = request.query_params.get("state", "")
        runner = request.query_params.get("runner", "")
        return {"state": state if state in overview.STATES else "", "runner": runner,
                "query": urlencode({"state": state, "runner": runner})}

    def _list(self, query: dict[str, Any]) -> Callable[[], dict[str, Any]]:
        return lambda: {"runs": overview.list_runs(
            backends(), states=(query["state"],) if query["state"] else (),
            runner=query["runner"], limit=100)}

    async def runs(self, request: Request) -> Response:
        query = self._runs_query(request)
        return await self._read(request, "runs.html", self._list(query), query)

    async def runs_rows(self, request: Request) -> Response:
        query = self._runs_query(request)
        return await self._read(request, "_runs.html", self._list(query), query)

    # One run --------------------------------------------------------------------------------------
    def _detail(self, run: str) -> Callable[[], dict[str, Any]]:
        return lambda: {"shown": overview.detail(backends(), run), "run": run}

    async def run(self, request: Request) -> Response:
        run = request.path_params["run"]
        count = request.query_params.get("n", "0")
        said = SAID.get(request.query_params.get("said", ""), "").format(
            n=int(count) if count.isdigit() else 0)
        return await self._read(request, "run.html", self._detail(run), {"run": run, "said": said})

    async def run_body(self, request: Request) -> Response:
        run = request.path_params["run"]
        return await self._read(request, "_run.html", self._detail(run), {"run": run})

    async def run_tree(self, request: Request) -> Response:
        run = request.path_params["run"]
        return await self._read(request, "_tree.html", lambda: {
            "tree": read_tree(backends(), run)}, {"run": run})

    async def kick(self, request: Request) -> Response:
        run = request.path_params["run"]
        return await self._act(request, run, lambda: {
            "said": "kicked", "n": len(overview.kick(backends(), run))})

    async def cancel(self, request: Request) -> Response:
        run = request.path_params["run"]
        return await self._act(request, run, lambda: {
            "said": "cancelled" if overview.cancel(backends(), run) else "not-cancelled"})

    async def _act(self, request: Request, run: str, act: Callable[[], dict[str, Any]]) -> Response:
        """Do a checked POST's action, then show the run again (POST, redirect, GET)."""
        if await self.guard.form(request) is None:
            return PlainTextResponse("refused: not a same-origin form of this dashboard", 403)
        try:
            said = await run_in_threadpool(act)
        except PackmuleError as err:
            return self._render(request, "run.html", {"run": run, "error": str(err)}, 503)
        return RedirectResponse(f"/runs/{run}?{urlencode(said)}", 303)

    # Workers and tubes ----------------------------------------------------------------------------
    def _workers(self) -> dict[str, Any]:
        return {"workers": overview.workers(backends()), "now": time.time()}

    async def workers(self, request: Request) -> Response:
        return await self._read(request, "workers.html", self._workers)

    async def workers_rows(self, request: Request) -> Response:
        return await self._read(request, "_workers.html", self._workers)

    async def tubes(self, request: Request) -> Response:
        return await self._read(request, "tubes.html", lambda: {"tubes": overview.tubes(backends())})

    async def tubes_rows(self, request: Request) -> Response:
        return await self._read(request, "_tubes.html", lambda: {"tubes": overview.tubes(backends())})

    # Signing in -----------------------------------------------------------------------------------
    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            return self._render(request, "login.html", {})
        form = await self.guard.form(request)
        if form is None:
            return PlainTextResponse("refused: not a same-origin form of this dashboard", 403)
        if not self.guard.token_matches(form.get("token", "")):
            return self._render(request, "login.html", {"error": "wrong token"}, 401)
        response = RedirectResponse("/", 303)
        response.set_cookie(COOKIE, self.guard.session, httponly=True, samesite="strict")
        return response


def serve(host: str, port: int, *, token: str) -> None:
    """Serve the dashboard until interrupted (uvicorn, one process)."""
    print(f"packmule dashboard on http://{host}:{port}/", flush=True)
    uvicorn.run(create_app(token=token), host=host, port=port,
                log_level="warning", access_log=False)

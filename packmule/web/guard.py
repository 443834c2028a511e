"""Who may use the dashboard: the host it is reached by, a token, and same-origin POSTs.

- Loopback (the default): requests must name a loopback host (``Host``),
  which stops a DNS-rebinding page from reading or acting through a
  victim's browser.
- A token (``PACKMULE_WEB_TOKEN``), required to listen beyond loopback:
  every request but the login page carries it, as the cookie the login
  page sets (``HttpOnly``, ``SameSite=Strict``) or as
  ``Authorization: Bearer <token>`` (a Prometheus scrape).
- Every POST (kick, cancel, log in) carries the page's CSRF token, a
  secret drawn when the dashboard starts that only its own pages show, and
  a cross-site ``Origin`` or ``Sec-Fetch-Site`` is refused outright.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request

COOKIE = "packmule_session"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
FORM_BYTES = 16 * 1024  # a form here holds a token or two


class Guard:
    """The checks of one running dashboard."""

    def __init__(self, *, token: str, loopback: bool) -> None:
        self.token = token
        self.loopback = loopback
        self.csrf = secrets.token_urlsafe(32)
        self._session = hmac.new(token.encode(), b"packmule dashboard session",
                                 hashlib.sha256).hexdigest() if token else ""

    def host_allowed(self, request: Request) -> bool:
        """Whether the ``Host`` header names a loopback host (always True beyond loopback)."""
        if not self.loopback:
            return True
        host = urlsplit("//" + request.headers.get("host", "")).hostname or ""
        return host in LOOPBACK_HOSTS or host.startswith("127.")

    def signed_in(self, request: Request) -> bool:
        """Whether the request carries the token (cookie or bearer); True when none is set."""
        if not self.token:
            return True
        cookie = request.cookies.get(COOKIE, "")
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(cookie, self._session) or (
            bool(bearer) and hmac.compare_digest(bearer, self.token))

    def token_matches(self, given: str) -> bool:
        """Whether ``given`` is the configured token (the login form)."""
        return bool(self.token) and hmac.compare_digest(given, self.token)

    @property
    def session(self) -> str:
        """The cookie value that proves a login (derived from the token, not the token)."""
        return self._session

    async def form(self, request: Request) -> dict[str, str] | None:
        """The POSTed form if it is same-origin and carries the CSRF token; None if refused.

        Forms are small and urlencoded; parsed here, not by a multipart library.
        """
        site = request.headers.get("sec-fetch-site", "same-origin")
        origin = request.headers.get("origin")
        # The host only: behind a TLS proxy the scheme the browser saw is not ours.
        if site not in ("same-origin", "none") or (
                origin is not None and urlsplit(origin).netloc != request.headers.get("host")):
            return None
        body = b""
        async for chunk in request.stream():  # read no more than a form can hold
            body += chunk
            if len(body) > FORM_BYTES:
                return None
        form = {key: values[0] for key, values in parse_qs(body.decode(errors="replace")).items()}
        if not hmac.compare_digest(form.get("csrf", ""), self.csrf):
            return None
        return form

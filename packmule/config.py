"""Settings: every default packmule uses, where it comes from, and why.

Settings come from ``packmule.configure(...)`` or, for what is not given
there, from the ``PACKMULE_*`` environment variables. They are read once,
lazily, so a worker or test can set the environment before the first use.
The configured :class:`Settings` is the only module-level mutable state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

from packmule.errors import ConfigurationError

Address = tuple[str, int]

_SCHEMES = {
    "PACKMULE_BEANSTALKD": ({"beanstalk", "beanstalkd", "tcp"}, 11300),
    "PACKMULE_MEMCACHED": ({"memcache", "memcached", "tcp"}, 11211),
    "PACKMULE_ETCD": ({"etcd", "http", "tcp", "etcds", "https"}, 2379),
}
_TLS_SCHEMES = frozenset({"etcds", "https"})
# The shortest signing secret accepted: a short one is guessed offline from one signed job.
MIN_SECRET_CHARS = 16
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclass(frozen=True, repr=False)
class Secret:
    """Text that is never shown: its ``repr`` and ``str`` hide the values.

    Settings hold secrets (signing secrets, etcd's password) in this type so
    that printing the settings, an error or a log line cannot leak them.

    Attributes:
        values: the secret texts, in order (several for a signing secret in rotation).
    """

    values: tuple[str, ...] = field(default=())

    def __repr__(self) -> str:
        return f"Secret(<{len(self.values)} hidden>)" if self.values else "Secret()"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self.values)

    @classmethod
    def of(cls, value: Secret | str | tuple[str, ...] | list[str]) -> Secret:
        """``value`` as a Secret: a string is one secret, a sequence several."""
        if isinstance(value, Secret):
            return value
        return cls((value,) if isinstance(value, str) else tuple(value))


@dataclass(frozen=True)
class Settings:
    """Where the servers are and how packmule behaves.

    Durations are seconds. Defaults are chosen for a job of a few seconds on
    a local network; each is overridable per runner where it says so.
    """

    beanstalkd: tuple[Address, ...] = (("127.0.0.1", 11300),)
    memcached: tuple[Address, ...] = (("127.0.0.1", 11211),)
    etcd: tuple[Address, ...] = (("127.0.0.1", 2379),)
    # Key prefix in memcached and etcd, so several applications can share servers.
    namespace: str = "packmule"
    # Default tube; a runner's `tube` attribute overrides it.
    tube: str = "packmule"
    # beanstalkd time-to-run. Short is fine: workers `touch` live jobs, so it
    # bounds only how long a dead worker's job waits before it is handed out again.
    ttr_seconds: float = 30.0
    # A raising job is released this many times before it fails for good.
    max_retries: int = 3
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 60.0
    # memcached keeps a run's job records and counters this long (its limit is 30 days).
    state_ttl_seconds: int = 7 * 24 * 3600
    # etcd keeps a finished run's record (value or failure, counts) this long.
    result_ttl_seconds: int = 7 * 24 * 3600
    # Socket timeout for memcached and beanstalkd commands other than reserve.
    socket_timeout_seconds: float = 10.0
    # A waiting caller re-checks that the run's state still exists this often
    # (doubling from the first value up to the second) between etcd wake-ups.
    health_check_seconds: tuple[float, float] = (0.25, 2.0)
    # A waiting caller rides out a server that is unreachable for this long (a
    # restart) before raising the error that names it.
    server_grace_seconds: float = 15.0
    # Workers cache a run's "cancelled" flag this long, to keep it off the per-job path.
    cancel_check_seconds: float = 0.5
    # A worker whose jobs are quick asks for up to this many at once, and records
    # their values in one write (see packmule.pace); 1: one job at a time.
    batch_jobs: int = 16
    # Signing (see README "Security"). Shared secrets: the first signs every job
    # body (HMAC-SHA256), any of them verifies, so a new one can be rolled in
    # before the old one is dropped. In the environment, comma-separated. Empty:
    # jobs are unsigned and workers run whatever is put on their tubes.
    secret: Secret = Secret()
    # A file holding the secrets instead (one a line, the first signs; blank
    # lines and `#` comments skipped): keeps them out of the environment.
    secret_file: str = ""
    # A worker with a secret also runs jobs that carry no signature (never one
    # with a wrong signature): only while signing is being rolled out.
    accept_unsigned: bool = False
    # etcd over TLS: set by `etcds://` URLs, or by any of the files below. The CA
    # file defaults to the system's roots; a client certificate needs its key.
    etcd_tls: bool = False
    etcd_ca_file: str = ""
    etcd_cert_file: str = ""
    etcd_key_file: str = ""
    # etcd authentication (needs TLS: the password and the token would otherwise
    # cross the network in clear). With `--client-cert-auth`, etcd can instead
    # take the certificate's common name as the user.
    etcd_user: str = ""
    etcd_password: Secret = Secret()
    # The dashboard (`packmule web`) asks for this token when set; it must be set
    # to listen beyond loopback. "" (the default): loopback only, no token.
    web_token: Secret = Secret()
    # A worker's registry record lives on an etcd lease this long, refreshed every
    # third of it: a worker that died leaves `packmule workers` within this time.
    worker_ttl_seconds: int = 10


_settings: Settings | None = None


def parse_urls(variable: str, text: str) -> tuple[Address, ...]:
    """Parse comma-separated server URLs such as ``beanstalk://10.0.0.5:11300``.

    A bare ``host:port`` or ``host`` is accepted; the port defaults to the
    server's usual one. Anything after the address (a path, a query) is
    refused rather than ignored: ``beanstalk//host:11300``, a typo for
    ``beanstalk://host:11300``, would otherwise read as the host
    ``beanstalk``. Raises :class:`ConfigurationError` naming the variable
    and the faulty part.
    """
    schemes, default_port = _SCHEMES[variable]
    addresses = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        url = urlsplit(part if "://" in part else f"tcp://{part}")
        if url.scheme not in schemes or not url.hostname or url.path not in ("", "/") \
                or url.query or url.fragment or "@" in url.netloc:
            raise ConfigurationError(
                f"{variable}: cannot use {part!r}; expected {sorted(schemes)[0]}://HOST:PORT"
            )
        try:
            port = url.port or default_port
        except ValueError as err:
            raise ConfigurationError(f"{variable}: bad port in {part!r}") from err
        addresses.append((url.hostname, port))
    if not addresses:
        raise ConfigurationError(f"{variable}: no server address in {text!r}")
    return tuple(addresses)


def tls_scheme(variable: str, text: str) -> bool:
    """Whether the URLs in ``text`` ask for TLS (``etcds://``, ``https://``).

    Raises:
        ConfigurationError: some URLs ask for TLS and others do not.
    """
    schemes = {part.strip().partition("://")[0] for part in text.split(",")
               if "://" in part}
    secure = schemes & _TLS_SCHEMES
    if secure and schemes - _TLS_SCHEMES:
        raise ConfigurationError(f"{variable}: mixes TLS and plain URLs in {text!r}")
    return bool(secure)


def _from_environment() -> dict[str, Any]:
    """Every setting given as ``PACKMULE_<SETTING>`` (``PACKMULE_RESULT_TTL_SECONDS=3600``).

    Server lists are URLs (see :func:`parse_urls`), a pair of durations is
    ``FIRST,SECOND``, numbers are numbers; anything else is a
    ConfigurationError naming the variable. An empty variable counts as unset.
    """
    found: dict[str, Any] = {}
    for setting in fields(Settings):
        variable = f"PACKMULE_{setting.name.upper()}"
        text = os.environ.get(variable, "").strip()
        if text:
            found[setting.name] = _parse(variable, text, setting.default)
    if "etcd" in found and "etcd_tls" not in found:
        found["etcd_tls"] = tls_scheme("PACKMULE_ETCD", os.environ["PACKMULE_ETCD"])
    return found


def _parse(variable: str, text: str, default: Any) -> Any:
    """``text`` as a value of the type of ``default``, or a ConfigurationError naming ``variable``."""
    if variable in _SCHEMES:
        return parse_urls(variable, text)
    if isinstance(default, Secret):  # never quoted in an error
        several = variable == "PACKMULE_SECRET"
        return Secret(tuple(p.strip() for p in text.split(",")) if several else (text,))
    if isinstance(default, bool):
        if text.lower() not in _TRUE | _FALSE:
            raise ConfigurationError(f"{variable}: cannot use {text!r} (expected true or false)")
        return text.lower() in _TRUE
    try:
        if isinstance(default, tuple):
            value = tuple(float(part) for part in text.split(","))
            if len(value) != len(default):
                raise ValueError(f"expected {len(default)} numbers")
            return value
        return type(default)(text)
    except ValueError as err:
        example = ",".join(map(str, default)) if isinstance(default, tuple) else default
        raise ConfigurationError(
            f"{variable}: cannot use {text!r}: {err} (expected a value like {example!r})"
        ) from err


def _check(settings: Settings) -> Settings:
    if not settings.namespace or any(c in settings.namespace for c in " /:\r\n"):
        raise ConfigurationError(f"namespace: {settings.namespace!r} must be non-empty, no ' /:'")
    check_tube(settings.tube)
    if settings.ttr_seconds < 2:
        raise ConfigurationError(f"ttr_seconds: {settings.ttr_seconds} is below 2 s")
    if settings.worker_ttl_seconds < 2:
        raise ConfigurationError(f"worker_ttl_seconds: {settings.worker_ttl_seconds} is below 2 s")
    if not 1 <= settings.batch_jobs <= 256:
        raise ConfigurationError(f"batch_jobs: {settings.batch_jobs} is not between 1 and 256")
    if settings.state_ttl_seconds > 30 * 24 * 3600:
        raise ConfigurationError("state_ttl_seconds: memcached allows at most 30 days")
    if settings.secret and settings.secret_file:
        raise ConfigurationError("secret and secret_file are both set: give one of them")
    signing_secrets(settings)
    _check_etcd_security(settings)
    return settings


def signing_secrets(settings: Settings) -> tuple[str, ...]:
    """The signing secrets, first the one that signs: ``secret``, or read from ``secret_file``.

    Read anew on each call: call it once per process or client, not per job.

    Raises:
        ConfigurationError: the file cannot be read or holds none, or a secret
            is shorter than MIN_SECRET_CHARS. The message never quotes a secret.
    """
    values = settings.secret.values
    if settings.secret_file:
        try:
            with open(settings.secret_file, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigurationError(f"secret_file: cannot read {settings.secret_file!r}: "
                                     f"{type(err).__name__}") from None
        values = tuple(line.strip() for line in text.splitlines()
                       if line.strip() and not line.strip().startswith("#"))
        if not values:
            raise ConfigurationError(f"secret_file: {settings.secret_file!r} holds no secret")
    for position, value in enumerate(values, 1):
        if len(value) < MIN_SECRET_CHARS:
            raise ConfigurationError(
                f"secret: secret {position} of {len(values)} has {len(value)} characters; use at "
                f"least {MIN_SECRET_CHARS} (e.g. the output of `openssl rand -hex 32`)")
    return values


def _check_etcd_security(settings: Settings) -> None:
    if bool(settings.etcd_cert_file) != bool(settings.etcd_key_file):
        raise ConfigurationError("etcd_cert_file and etcd_key_file: give both or neither")
    if bool(settings.etcd_user) != bool(settings.etcd_password):
        raise ConfigurationError("etcd_user and etcd_password: give both or neither")
    if settings.etcd_user and not etcd_uses_tls(settings):
        raise ConfigurationError(
            "etcd_user: etcd authentication needs TLS (an etcds:// URL or etcd_ca_file), "
            "or the password and the token would cross the network in clear")


def etcd_uses_tls(settings: Settings) -> bool:
    """Whether packmule talks to etcd over TLS."""
    return bool(settings.etcd_tls or settings.etcd_ca_file or settings.etcd_cert_file)


def check_tube(tube: str) -> str:
    """Return ``tube`` if beanstalkd accepts it as a tube name, else raise."""
    if not tube or ":" in tube or len(tube.encode()) > 200 or tube.startswith("-"):
        raise ConfigurationError(
            f"tube: {tube!r} is not a beanstalkd tube name (1-200 bytes, no ':')"
        )
    return tube


def configure(**changes: Any) -> Settings:
    """Change settings for this process; returns the new settings.

    Server lists may be given as URL strings (comma-separated) or address
    tuples; an etcd list of ``etcds://`` URLs turns TLS on. ``secret`` may be
    a string (one secret) or a list (the first signs). Unknown names raise
    :class:`ConfigurationError`.
    """
    global _settings
    known = {f.name for f in fields(Settings)}
    for name, value in list(changes.items()):
        if name not in known:
            raise ConfigurationError(f"configure: unknown setting {name!r}")
        if name in ("beanstalkd", "memcached", "etcd") and isinstance(value, str):
            changes[name] = parse_urls(f"PACKMULE_{name.upper()}", value)
            if name == "etcd" and "etcd_tls" not in changes:
                changes["etcd_tls"] = tls_scheme("PACKMULE_ETCD", value)
        if name in ("secret", "etcd_password", "web_token"):
            changes[name] = Secret.of(value)
    _settings = _check(replace(settings(), **changes))
    return _settings


def settings() -> Settings:
    """The settings in force, read from the environment on first use."""
    global _settings
    if _settings is None:
        _settings = _check(Settings(**_from_environment()))
    return _settings


def reset() -> None:
    """Forget configured settings; the next use reads the environment again."""
    global _settings
    _settings = None


def format_address(address: Address) -> str:
    """``host:port``, the form used in every error message and JobRef."""
    return f"{address[0]}:{address[1]}"


__all__ = ["Address", "Secret", "Settings", "configure", "format_address", "settings"]

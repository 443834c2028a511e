"""etcd with TLS and authentication, against a real etcd started for these tests.

The etcd serves TLS only, to clients whose certificate its CA signed, and
has authentication on: a user whose role may read and write the keys under
``/ts`` (every namespace of these tests starts with ``ts``). packmule works
with the right settings, and fails with an error naming what failed with
wrong ones: the certificate, the authentication, a permission, the address.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import etcd3
import grpc
import pytest
from conftest import PYTHONPATH, Workers, environment
from etcd3 import etcdrpc
from tls_files import make_ca, make_etcd_tls
from trust_runners import Marked, Nested

import packmule
from packmule import config
from packmule.backends import backends
from packmule.coord import Coordinator, Security
from packmule.errors import ConfigurationError, CoordinatorUnavailable, ServerRefused
from packmule.servers import EtcdTls, LocalServers, start_local_servers

USER, PASSWORD = "packmule", "etcd-password-0123456789"
ROOT_PASSWORD = "root-password-0123456789"


def _admin(servers: LocalServers, tls: EtcdTls, *, user: str | None = None,
           password: str | None = None) -> etcd3.MultiEndpointEtcd3Client:
    """A raw etcd client with the test's client certificate (and root's credentials)."""
    host, port = servers.etcd_urls[0].split("://")[1].split(":")
    credentials = grpc.ssl_channel_credentials(
        tls.ca_file.read_bytes(), tls.client_key_file.read_bytes(),
        tls.client_cert_file.read_bytes())
    return etcd3.MultiEndpointEtcd3Client(
        [etcd3.Endpoint(host, int(port), secure=True, creds=credentials)], timeout=10,
        user=user, password=password)


def _enable_auth(servers: LocalServers, tls: EtcdTls) -> None:
    """root (needed to turn auth on), a role on ``/ts``, the test's user with it; auth on."""
    client = _admin(servers, tls)
    auth = client.authstub
    auth.UserAdd(etcdrpc.AuthUserAddRequest(name="root", password=ROOT_PASSWORD), 10)
    auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user="root", role="root"), 10)
    auth.RoleAdd(etcdrpc.AuthRoleAddRequest(name="packmule-tests"), 10)
    permission = etcdrpc.auth_pb2.Permission(
        permType=etcdrpc.auth_pb2.Permission.READWRITE, key=b"/ts", range_end=b"/tt")
    auth.RoleGrantPermission(
        etcdrpc.AuthRoleGrantPermissionRequest(name="packmule-tests", perm=permission), 10)
    auth.UserAdd(etcdrpc.AuthUserAddRequest(name=USER, password=PASSWORD), 10)
    auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user=USER, role="packmule-tests"), 10)
    auth.AuthEnable(etcdrpc.AuthEnableRequest(), 10)
    client.close()


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalServers, EtcdTls]]:
    """Servers whose etcd has TLS with client certificates and authentication on."""
    tls = make_etcd_tls(tmp_path_factory.mktemp("tls"))
    with start_local_servers(etcd_tls=tls) as servers:
        _enable_auth(servers, tls)
        yield servers, tls


@contextmanager
def _settings(servers: LocalServers, namespace: str, **variables: str) -> Iterator[dict[str, str]]:
    """This process's settings for one test (restored after); yields a worker's variables."""
    variables = {**servers.env(), "PACKMULE_NAMESPACE": namespace, "PACKMULE_TUBE": namespace,
                 **variables}
    with environment(variables):
        yield {**variables, "PYTHONPATH": PYTHONPATH}


def _namespace(prefix: str = "ts") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


USER_VARIABLES = {"PACKMULE_ETCD_USER": USER, "PACKMULE_ETCD_PASSWORD": PASSWORD}


@pytest.mark.timeout(90)
def test_packmule_works_over_tls_with_a_user(
        secure: tuple[LocalServers, EtcdTls], tmp_path: Path) -> None:
    servers, _ = secure
    with _settings(servers, _namespace(), **USER_VARIABLES) as variables:
        workers = Workers(variables)
        try:
            workers.start("trust_runners", 2)
            assert Marked("tls").run(str(tmp_path / "marks")) == 3
            assert Nested("tls").run(3) == 8, "leases, markers and watches over TLS"
            record = Marked.find("tls")
            assert record is not None and record.state == "done"
        finally:
            workers.stop()


def _first_etcd_error(servers: LocalServers, **variables: str) -> Exception:
    """The error a run meets with these settings (it never gets past etcd)."""
    with _settings(servers, _namespace(), **variables):
        with pytest.raises((CoordinatorUnavailable, ServerRefused)) as raised:
            Marked("wrong").run("/nonexistent/marks")
        backends().close()
        return raised.value


@pytest.mark.timeout(60)
def test_a_wrong_ca_or_no_client_certificate_is_named(
        secure: tuple[LocalServers, EtcdTls], tmp_path: Path) -> None:
    servers, _ = secure
    other_ca, _ = make_ca(tmp_path, "some-other-ca")
    wrong_ca = _first_etcd_error(servers, PACKMULE_ETCD_CA_FILE=str(other_ca), **USER_VARIABLES)
    assert isinstance(wrong_ca, CoordinatorUnavailable)
    assert "TLS handshake failed (certificate)" in str(wrong_ca)
    assert wrong_ca.address == servers.etcd_urls[0].split("://")[1]
    no_cert = _first_etcd_error(servers, PACKMULE_ETCD_CERT_FILE="", PACKMULE_ETCD_KEY_FILE="",
                                **USER_VARIABLES)
    assert "TLS handshake failed (certificate)" in str(no_cert)


@pytest.mark.timeout(60)
def test_wrong_credentials_are_named_and_never_shown(
        secure: tuple[LocalServers, EtcdTls]) -> None:
    servers, _ = secure
    wrong = "not-the-password-42"
    refused = _first_etcd_error(servers, PACKMULE_ETCD_USER=USER, PACKMULE_ETCD_PASSWORD=wrong)
    assert isinstance(refused, ServerRefused)
    assert "authentication failed" in str(refused) and wrong not in str(refused)
    assert "etcd_user and etcd_password" in str(refused)
    nobody = _first_etcd_error(servers)  # the certificate's name is no user: no permission
    assert isinstance(nobody, ServerRefused) and "permission denied" in str(nobody)


@pytest.mark.timeout(60)
def test_a_namespace_outside_the_users_role_is_refused_naming_the_permission(
        secure: tuple[LocalServers, EtcdTls]) -> None:
    servers, _ = secure
    variables = {**USER_VARIABLES, "PACKMULE_NAMESPACE": _namespace("elsewhere")}
    denied = _first_etcd_error(servers, **variables)
    assert isinstance(denied, ServerRefused) and "permission denied" in str(denied)


@pytest.mark.timeout(60)
def test_a_plain_url_to_a_tls_etcd_is_unreachable(secure: tuple[LocalServers, EtcdTls]) -> None:
    servers, _ = secure
    plain = servers.etcd_urls[0].replace("etcds://", "etcd://")
    unreachable = _first_etcd_error(servers, PACKMULE_ETCD=plain, PACKMULE_ETCD_CA_FILE="",
                                    PACKMULE_ETCD_CERT_FILE="", PACKMULE_ETCD_KEY_FILE="")
    assert isinstance(unreachable, CoordinatorUnavailable) and "unreachable" in str(unreachable)


@pytest.mark.timeout(60)
def test_an_expired_token_is_renewed_and_the_request_repeated(
        secure: tuple[LocalServers, EtcdTls]) -> None:
    """etcd forgets a token unused for --auth-token-ttl, or when the password changes."""
    servers, tls = secure
    with _settings(servers, _namespace(), **USER_VARIABLES):
        coord = backends().coord
        coord.put(coord.prefix + "/probe", b"1")
        root = _admin(servers, tls, user="root", password=ROOT_PASSWORD)
        root.authstub.UserChangePassword(  # the same password: only the tokens go
            etcdrpc.AuthUserChangePasswordRequest(name=USER, password=PASSWORD), 10,
            metadata=root.metadata)
        root.close()
        assert coord.get(coord.prefix + "/probe") == b"1"
        assert coord.grant_lease(60) > 0
        backends().close()


def test_etcd_settings_are_checked_before_use(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="needs TLS"):
        config._check(config.Settings(etcd_user=USER, etcd_password=config.Secret((PASSWORD,))))
    with pytest.raises(ConfigurationError, match="give both"):
        config._check(config.Settings(etcd_tls=True, etcd_cert_file="client.crt"))
    missing = str(tmp_path / "absent-ca.crt")
    with pytest.raises(ConfigurationError, match="etcd_ca_file: cannot read"):
        Coordinator((("127.0.0.1", 1),), namespace="ts", timeout_seconds=1,
                    security=Security(tls=True, ca_file=missing))
    with pytest.raises(ConfigurationError, match="mixes TLS and plain"):
        packmule.configure(etcd="etcds://127.0.0.1:1,etcd://127.0.0.1:2")
    assert packmule.configure(etcd="etcds://127.0.0.1:2379").etcd_tls
    config.reset()

"""Certificates for an etcd with TLS, made by the tests with the ``openssl`` command.

A CA signs etcd's certificate (valid for 127.0.0.1) and a client's; a second
CA, which signed neither, stands for a wrong one. P-256 keys: made in
milliseconds, unlike RSA.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from packmule.errors import ServerStartError
from packmule.servers import EtcdTls

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str | Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise ServerStartError("openssl not found: install the Debian package 'openssl'")
    subprocess.run([binary, *map(str, args)], check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: its certificate and key."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    _openssl("req", "-x509", *_KEY, "-keyout", key, "-out", cert, "-days", "2",
             "-subj", f"/CN={name}")
    return cert, key


def _issue(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, request = folder / f"{name}.crt", folder / f"{name}.key", folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("req", *_KEY, "-keyout", key, "-out", request, "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext)
    return cert, key


def make_etcd_tls(folder: Path) -> EtcdTls:
    """A CA, etcd's certificate for 127.0.0.1 and a client's, all signed by that CA."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = make_ca(folder, "packmule-test-ca")
    server = _issue(folder, "etcd", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n")
    client = _issue(folder, "packmule-client", ca, "extendedKeyUsage=clientAuth\n")
    return EtcdTls(ca[0], server[0], server[1], client[0], client[1])

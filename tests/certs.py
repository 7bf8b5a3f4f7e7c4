"""Certificates for TLS tests, made by the `openssl` command line in a temporary folder: a CA,
a server certificate for 127.0.0.1 and localhost signed by it, a client certificate signed by a
second CA (the one a mutual-TLS server trusts), and a rogue client certificate from a third CA
the server does not trust. EC P-256 keys: quick to make."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certificates:
    ca: Path  # signs the server certificate; clients trust it
    server_cert: Path
    server_key: Path
    client_ca: Path  # signs client certificates; a mutual-TLS server trusts it
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from a CA nobody here trusts
    rogue_key: Path


def make_certificates(folder: Path) -> Certificates:
    """Write the certificates under `folder`; needs the `openssl` command."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is needed to make test certificates")
    ca = _ca(folder, "server-ca")
    client_ca = _ca(folder, "client-ca")
    rogue_ca = _ca(folder, "rogue-ca")
    san = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"
    server = _signed(folder, "server", ca, san)
    client = _signed(folder, "client", client_ca, "extendedKeyUsage=clientAuth")
    rogue = _signed(folder, "rogue", rogue_ca, "extendedKeyUsage=clientAuth")
    return Certificates(
        ca=ca[0], server_cert=server[0], server_key=server[1],
        client_ca=client_ca[0], client_cert=client[0], client_key=client[1],
        rogue_cert=rogue[0], rogue_key=rogue[1],
    )  # fmt: skip


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def _key(path: Path) -> Path:
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", path)
    return path


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key = _key(folder / f"{name}.key")
    cert = folder / f"{name}.pem"
    _openssl("req", "-x509", "-new", "-key", key, "-out", cert, "-days", "2", "-subj",
             f"/CN=tandem test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    return cert, key


def _signed(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key = _key(folder / f"{name}.key")
    request, cert, ext = folder / f"{name}.csr", folder / f"{name}.pem", folder / f"{name}.ext"
    ext.write_text(extensions + "\n")
    _openssl("req", "-new", "-key", key, "-out", request, "-subj", f"/CN=tandem test {name}")
    _openssl("x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext)  # fmt: skip
    return cert, key

"""The API's TLS on the server: its certificate and key, and optionally the roots client
certificates must chain to (mutual TLS). The client's side: bench.serving.connection.

`TlsConfig` serves gRPC (`grpc_credentials`) and, unchanged, an HTTP edge on uvicorn
(`uvicorn_kwargs`). Files are read when credentials are made, so a missing file is an error that
names its field before the server listens. Holds no keys in memory beyond that call.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """The server's TLS: `cert_file` (PEM chain) and `key_file` (PEM private key), both or
    neither (plaintext); `client_ca_file`: PEM roots a client certificate must chain to (mutual
    TLS; None: clients need no certificate)."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                f"tls: cert_file={self.cert_file!r} and key_file={self.key_file!r}: give both "
                "(--tls-cert and --tls-key) or neither"
            )
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError(
                f"tls: client_ca_file={self.client_ca_file!r} (mutual TLS) needs the server's "
                "own --tls-cert and --tls-key"
            )

    @property
    def is_enabled(self) -> bool:
        return self.cert_file is not None

    @property
    def is_mutual(self) -> bool:
        return self.client_ca_file is not None

    def grpc_credentials(self) -> Any:
        """grpc.ServerCredentials for `server.add_secure_port`; raises ValueError for a file
        that cannot be read."""
        import grpc

        assert self.cert_file is not None and self.key_file is not None, "TLS is off"
        pair = (_read("key_file", self.key_file), _read("cert_file", self.cert_file))
        roots = _read_optional("client_ca_file", self.client_ca_file)
        return grpc.ssl_server_credentials(
            [pair], root_certificates=roots, require_client_auth=roots is not None
        )

    def uvicorn_kwargs(self) -> dict[str, Any]:
        """The same settings as uvicorn.run/uvicorn.Config keyword arguments ({} when off)."""
        if not self.is_enabled:
            return {}
        return {
            "ssl_certfile": self.cert_file,
            "ssl_keyfile": self.key_file,
            "ssl_ca_certs": self.client_ca_file,
            "ssl_cert_reqs": ssl.CERT_REQUIRED if self.is_mutual else ssl.CERT_NONE,
        }


def _read(field: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"tls: {field}={path!r}: cannot read it: {e.strerror}") from None


def _read_optional(field: str, path: str | None) -> bytes | None:
    return None if path is None else _read(field, path)

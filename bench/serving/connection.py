"""How a client reaches a Tandem service that wants TLS or an API key (`tandem client`,
`tandem bench`): its trust roots and own certificate (`ClientTls`), the channel, and the
`authorization` metadata every call sends. The server's side: router.tls and router.auth.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

API_KEY_ENV = "TANDEM_API_KEY"
Metadata = tuple[tuple[str, str], ...]  # sent with every call: the API key, if any


@dataclass(frozen=True, slots=True)
class ClientTls:
    """A client's TLS: `ca_file` (PEM roots the server's certificate must chain to; None: the
    system's), and for mutual TLS its own `cert_file` and `key_file`, both or neither."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                f"client tls: cert_file={self.cert_file!r} and key_file={self.key_file!r}: give "
                "both (--tls-client-cert and --tls-client-key) or neither"
            )

    def grpc_credentials(self) -> Any:
        """grpc.ChannelCredentials for grpc.secure_channel / grpc.aio.secure_channel."""
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=_read_optional("ca_file", self.ca_file),
            private_key=_read_optional("key_file", self.key_file),
            certificate_chain=_read_optional("cert_file", self.cert_file),
        )


def open_channel(target: str, tls: ClientTls | None, aio: bool = False) -> Any:
    """A gRPC channel to `target`: over TLS when `tls` is given, else plaintext; grpc.aio's
    when `aio`."""
    import grpc

    module: Any = grpc.aio if aio else grpc
    if tls is None:
        return module.insecure_channel(target)
    return module.secure_channel(target, tls.grpc_credentials())


def connection_of(args: argparse.Namespace) -> tuple[ClientTls | None, Metadata]:
    """(ClientTls, or None for plaintext; the call metadata) from the flags of
    bench.serving.cli.add_connection_arguments; raises ValueError for a half-given client
    certificate."""
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    return client_tls_of(args), (() if key is None else (("authorization", f"Bearer {key}"),))


def client_tls_of(args: argparse.Namespace) -> ClientTls | None:
    """ClientTls from the flags of bench.serving.cli.add_tls_arguments, or None for plaintext
    (none of them given)."""
    uses_tls = args.tls or any((args.tls_ca, args.tls_client_cert, args.tls_client_key))
    return ClientTls(args.tls_ca, args.tls_client_cert, args.tls_client_key) if uses_tls else None


def _read(field: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"tls: {field}={path!r}: cannot read it: {e.strerror}") from None


def _read_optional(field: str, path: str | None) -> bytes | None:
    return None if path is None else _read(field, path)

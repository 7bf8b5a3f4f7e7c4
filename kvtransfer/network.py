"""Where a worker's KV endpoints listen: the node's own address or a named interface's, on ports
from a configured range, never on every interface (KVNetworkConfig, resolve_kv_address,
listen_socket, use_interface for GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME). Configuration: CLI
flag > environment > default (--kv-interface / TANDEM_KV_INTERFACE, --kv-ports /
TANDEM_KV_PORTS). Stdlib only. How gloo's and NCCL's own ports fit the range: docs/kvtransfer.md.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import random
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from contracts.errors import KVTransferError
from kvtransfer.layout import KVLayout

logger = logging.getLogger(__name__)

INTERFACE_ENV = "TANDEM_KV_INTERFACE"
PORTS_ENV = "TANDEM_KV_PORTS"
SOCKET_IFNAME_ENVS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address
_MAX_IFNAME_BYTES = 15


@dataclass(frozen=True, slots=True)
class KVNetworkConfig:
    """How workers place their KV endpoints. interface None: the node's address (Ray's node
    IP); ports (0, 0): any free port."""

    interface: str | None = None
    port_min: int = 0
    port_max: int = 0

    def __post_init__(self) -> None:
        if self.interface is not None and (
            not isinstance(self.interface, str)
            or not 0 < len(self.interface.encode()) <= _MAX_IFNAME_BYTES
            or "/" in self.interface
            or self.interface.strip() != self.interface
        ):
            raise ValueError(f"interface={self.interface!r} must be a network interface name")
        for name in ("port_min", "port_max"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= 65535:
                raise ValueError(f"{name}={value!r} must be an int in [0, 65535]")
        if (self.port_min == 0) != (self.port_max == 0) or self.port_min > self.port_max:
            raise ValueError(
                f"port range {self.port_min}-{self.port_max}: give both ends, min <= max "
                "(or 0-0 for any free port)"
            )

    @classmethod
    def from_environment(
        cls,
        interface: str | None = None,
        ports: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> KVNetworkConfig:
        """From flags (interface, ports "MIN-MAX"), else TANDEM_KV_INTERFACE / TANDEM_KV_PORTS.
        Raises ValueError naming a malformed value."""
        env = os.environ if environ is None else environ
        interface = interface or env.get(INTERFACE_ENV) or None
        ports = ports or env.get(PORTS_ENV) or None
        if ports is None:
            return cls(interface)
        low, sep, high = ports.partition("-")
        if not sep or not low.strip().isdigit() or not high.strip().isdigit():
            raise ValueError(f"KV ports {ports!r} must look like MIN-MAX, e.g. 40000-40999")
        return cls(interface, int(low), int(high))

    @property
    def has_port_range(self) -> bool:
        return self.port_max > 0


@dataclass(frozen=True, slots=True)
class KVAddress:
    """A worker's KV address: what it binds and advertises, and the interface holding it
    (None if no interface holds it, e.g. an address of another host given by mistake)."""

    host: str
    interface: str | None


def resolve_kv_address(config: KVNetworkConfig, node_ip: str) -> KVAddress:
    """The configured interface's IPv4 address, else `node_ip` (the node's address as the
    cluster knows it). Raises ValueError naming the interface if it has no IPv4 address."""
    if config.interface is not None:
        return KVAddress(interface_address(config.interface), config.interface)
    interface = interface_of(node_ip)
    if interface is None:
        logger.warning(
            "no interface here holds the node address %s: GLOO_SOCKET_IFNAME and "
            "NCCL_SOCKET_IFNAME stay unset, so NCCL may carry KV over another interface; "
            "name one with --kv-interface (%s)", node_ip, INTERFACE_ENV,
        )  # fmt: skip
    return KVAddress(node_ip, interface)


def interface_address(name: str) -> str:
    """The IPv4 address of interface `name`; ValueError (listing the interfaces) if none."""
    request = struct.pack("256s", name.encode()[:_MAX_IFNAME_BYTES])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            reply = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
        except OSError as e:
            names = ", ".join(n for _, n in socket.if_nameindex())
            raise ValueError(
                f"KV interface {name!r} has no IPv4 address ({os.strerror(e.errno or 0)}); "
                f"interfaces here: {names}"
            ) from None
    return socket.inet_ntoa(reply[20:24])


def interface_of(address: str) -> str | None:
    """The interface holding IPv4 `address`, or None."""
    for _, name in socket.if_nameindex():
        with contextlib.suppress(ValueError):
            if interface_address(name) == address:
                return name
    return None


def use_interface(name: str | None) -> None:
    """Point gloo's and NCCL's default socket interface at `name` in this process (before any
    pair forms), so every KV connection leaves by the same interface. A different value set
    by hand is replaced, with a warning."""
    if name is None:
        return
    for variable in SOCKET_IFNAME_ENVS:
        old = os.environ.get(variable)
        if old is not None and old != name:
            logger.warning("%s=%s replaced by the KV interface %s", variable, old, name)
        os.environ[variable] = name


def listen_socket(host: str, config: KVNetworkConfig, backlog: int = 128) -> socket.socket:
    """A TCP socket listening on (host, a port of the configured range, tried in random
    order; any free port without a range). Raises KVTransferError if every port is taken."""
    ports = list(range(config.port_min, config.port_max + 1)) if config.has_port_range else [0]
    random.shuffle(ports)
    for port in ports:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            sock.bind((host, port))
            sock.listen(backlog)
            return sock
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE:
                raise KVTransferError(f"cannot listen on {host}:{port}: {e}") from e
    raise KVTransferError(
        f"no free port in the KV range {config.port_min}-{config.port_max} on {host}"
    )


@dataclass(frozen=True, slots=True)
class EndpointAddress:
    """Where a decode worker's endpoint accepts pairs (kvtransfer.pair). Here, torch-free: the
    control plane passes it from decode to prefill workers in a process without torch."""

    host: str
    control_port: int
    layout: KVLayout | None = None  # the receiver's KV layout, checked by connect_pair

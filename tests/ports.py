"""A range of free TCP ports for tests that configure a KV port range (instead of fixed
numbers another process may hold)."""

from __future__ import annotations

import contextlib
import random
import socket


def free_port_range(count: int, host: str = "127.0.0.1", low: int = 20000) -> tuple[int, int]:
    """(first, last) of `count` consecutive ports free on `host` right now, below the
    ephemeral range (where the OS would hand them out). Raises RuntimeError if none found."""
    for _ in range(200):
        first = random.randrange(low, 32000 - count)
        socks: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((host, port))
            return first, first + count - 1
        except OSError:
            continue
        finally:
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.close()
    raise RuntimeError(f"no {count} consecutive free ports on {host}")

"""KV pairing in the running service (docs/reliability.md, F6; issue 16 item 2): connections to a
decode worker's KV control port that never complete a formation - idle, or stopped mid-frame -
do not keep a pool down. The prefill worker is killed with them open; its replacement pairs and
serves well inside the transport's 60 s connect timeout (before the fix, one pairing thread sat
on each stalled connection for that long and every replacement failed)."""

from __future__ import annotations

import socket
import time

import pytest

from engine.config import EngineConfig
from kvtransfer.codec import encode
from kvtransfer.messages import PairHello
from tests.integration.test_service import generate, greedy_sampling, local_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ray = pytest.importorskip("ray")
REPLACED_WITHIN_S = 55  # below the connect timeout: a stalled pairing would exceed it


def test_stalled_kv_connections_do_not_keep_a_pool_down() -> None:
    from cluster.service import ServiceConfig

    config = ServiceConfig(
        engine=EngineConfig(device="cpu", num_kv_blocks=256, block_size=16),
        mode="disaggregated", num_prefill_workers=1, num_decode_workers=1, port=0,
    )  # fmt: skip
    with local_service(config) as running:
        service = running.service
        address = ray.get(service.workers[0].open_endpoint.remote(), timeout=30)
        control = (address.host, address.control_port)
        stuck = [socket.create_connection(control) for _ in range(2)]  # idle
        half_open = socket.create_connection(control)
        half_open.sendall(encode(PairHello("stalled/1", b"n" * 32))[:5])
        stuck.append(half_open)
        try:
            victim = service.prefill_workers[0]
            killed_at = time.monotonic()
            ray.kill(victim, no_restart=True)
            while service.prefill_workers[0] is victim:
                elapsed_s = time.monotonic() - killed_at
                assert elapsed_s < REPLACED_WITHIN_S, "the prefill pool stayed down"
                time.sleep(0.2)
            responses = generate(running.stub, text="Hi", sampling=greedy_sampling(4))
            assert responses[-1].usage.completion_tokens == 4
            assert service.num_replaced == 1  # one replacement, not one per failed attempt
            running.assert_workers_idle_and_intact()
        finally:
            for sock in stuck:
                sock.close()

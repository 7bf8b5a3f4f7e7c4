"""Peer processes for the KV-transfer protocol tests: each role runs in a spawned process with
its own block manager and KV cache, forms real pairs (TCP control + gloo channel) and reports
what happened through a multiprocessing pipe (test plumbing only: the transfer protocol itself
never pickles).

Roles:
    receiver  accepts `num_pairs` pairs, runs one KVReceiver per pair, releases or checks what
              arrives, reports per-transfer results and the SHA-256 of received KV.
    sender    pairs with every given endpoint, pins and submits the given transfers (in the
              given order, all at once), waits, reports results and the SHA-256 of sent KV.
Both end with check_integrity() of their block manager: no holds, every block free.
"""

from __future__ import annotations

import hashlib
import math
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch

from engine.block_manager import BlockManager
from kvtransfer.coalesce import gather_blocks
from kvtransfer.layout import KVLayout
from kvtransfer.messages import TransferAck
from kvtransfer.pair import ReceiverEndpoint, connect_pair
from kvtransfer.protocol import TransferConfig, TransferMetrics
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import KVSender
from kvtransfer.staging import StagingPool
from kvtransfer.transport import TransportConfig

HOST = "127.0.0.1"
NUM_LAYERS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 4, 4, 2, 8
SRC_BLOCKS, DST_BLOCKS = 48, 64
TRANSPORT = TransportConfig(
    backend="gloo", timeout_s=10.0, connect_timeout_s=30.0, gloo_hostname=HOST
)


@dataclass(frozen=True)
class Spec:
    """One transfer a sender submits."""

    transfer_id: str
    num_tokens: int
    seed: int  # picks the source blocks
    layers_per_chunk: int = NUM_LAYERS
    # "", "slow", "abort_at_1", "stall_at_1", "busy_until_pair_fails" (chunk 0 is ready only
    # once the pair has failed: a transfer thread too busy to see its answer first)
    behavior: str = ""
    endpoint: int = 0  # index of the receiver it goes to

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_tokens / BLOCK_SIZE)


@dataclass
class Report:
    results: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (status, reason)
    digests: dict[str, str] = field(default_factory=dict)  # id -> sha256 of the KV moved
    integrity: str = "not checked"
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    steps: dict[str, list[str]] = field(default_factory=dict)  # id -> its timeline's step names


def kv_cache(num_blocks: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Random bytes in an engine cache's shape; uint8 is the packed FP8 cache (engine.kv_quant):
    rows of HEAD_DIM e4m3 bytes plus a 4-byte scale; int8 the per-head one (e4m3 bytes only)."""
    row = HEAD_DIM + 4 if dtype == torch.uint8 else HEAD_DIM
    shape = (NUM_LAYERS, 2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, row)
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0, 256, (math.prod(shape) * dtype.itemsize,), dtype=torch.uint8, generator=generator
    )
    return raw.view(dtype).view(shape)


def layout_of(cache: torch.Tensor, scales_digest: str | None = None) -> KVLayout:
    """The cache's layout; a per-head FP8 (int8) cache's needs the digest of its scales."""
    return KVLayout.of_cache(cache, "test-model", scales_digest=scales_digest)


def digest(cache: torch.Tensor, block_ids: tuple[int, ...] | list[int]) -> str:
    return hashlib.sha256(
        gather_blocks(cache, list(block_ids)).contiguous().view(torch.uint8).numpy().tobytes()
    ).hexdigest()


def source_blocks(spec: Spec) -> list[int]:
    generator = torch.Generator().manual_seed(spec.seed)
    return torch.randperm(SRC_BLOCKS, generator=generator)[: spec.num_blocks].tolist()


def integrity(block_manager: BlockManager) -> str:
    try:
        block_manager.check_integrity([], holders=())
    except AssertionError as e:
        return f"broken: {e}"
    return "ok"


def metrics_dict(metrics: TransferMetrics) -> dict[str, Any]:
    return {
        name: getattr(metrics, name)
        for name in (
            "bytes_sent",
            "bytes_received",
            "transfers_completed",
            "transfers_failed",
            "leases_expired",
        )
    }


def run_role(role: str, params: dict[str, Any], conn: Connection) -> None:
    report = Report()
    try:
        ROLES[role](params, conn, report)
    except BaseException:
        report.error = traceback.format_exc()
    conn.send(report)


# ---------------------------------------------------------------------------------------------


class _NoAckReceiver(KVReceiver):
    """A receiver that takes the data and never confirms it (a misbehaving peer)."""

    def _verify(self, incoming: Any) -> None:
        pass


class _SlowAckReceiver(KVReceiver):
    """A receiver whose Acks take 0.5 s to go out (a busy control thread): its owner sees the
    transfer completed, and closes, before the Ack has left."""

    def _send(self, message: Any) -> None:
        if isinstance(message, TransferAck):
            time.sleep(0.5)
        super()._send(message)


class _SlowAfterSendSender(KVSender):
    """A sender whose transfer thread pauses 0.3 s after each chunk's send (a busy thread):
    an Ack on data, then the receiver's close, reach it before it has moved on to Done."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        send = self._shipper.send

        def send_then_pause(*send_args: Any) -> tuple[int, int]:
            sent = send(*send_args)
            time.sleep(0.3)
            return sent

        self._shipper.send = send_then_pause  # type: ignore[method-assign]


def receiver_role(params: dict[str, Any], conn: Connection, report: Report) -> None:
    dtype = params.get("dtype", torch.float32)
    config: TransferConfig = params.get("config", TransferConfig())
    num_blocks = params.get("num_blocks", DST_BLOCKS)
    cache = kv_cache(num_blocks, seed=999, dtype=dtype)
    block_manager = BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=False)
    pool = StagingPool(params.get("staging_bytes", 1 << 22), "cpu", dtype, granularity_bytes=4096)
    metrics = TransferMetrics()
    endpoint = ReceiverEndpoint(HOST)
    conn.send(endpoint.address)
    cls = _NoAckReceiver if params.get("no_ack") else KVReceiver
    cls = _SlowAckReceiver if params.get("slow_ack") else cls
    # an offer finding no room waits for some (as a TP decode engine's staging region does)
    wait_for_room = (lambda num_blocks: True) if params.get("wait_for_room") else None
    hold_s = params.get("hold_s", 0.0)  # how long arrived KV stays held before its release
    held: list[tuple[float, str]] = []  # (release at, owner)
    receivers = []
    for _ in range(params.get("num_pairs", 1)):
        pair = endpoint.accept(TRANSPORT)
        assert pair is not None, "no sender came"
        channel, control = pair
        receivers.append(
            cls(channel, control, cache, layout_of(cache), block_manager.reserve,
                block_manager.release, pool, config, metrics, wait_for_room=wait_for_room)
        )  # fmt: skip
    expected: list[str] = params["transfer_ids"]
    abort_when_live = params.get("abort_when_live", False)
    deadline = time.monotonic() + params.get("deadline_s", 60.0)
    announced = False
    while time.monotonic() < deadline:
        # Decide before polling: whatever counts as done here is already in the poll below.
        done = [t for t in expected if any(r.result(t) for r in receivers)]
        idle = not any(r.num_live for r in receivers)
        all_failed = all(r.failure for r in receivers)
        for receiver in receivers:
            for kv in receiver.poll():
                report.digests[kv.transfer_id] = digest(cache, kv.block_ids)
                held.append((time.monotonic() + hold_s, kv.owner))
            if receiver.num_live and not announced:
                conn.send("live")  # a transfer is under way: the test may now kill the sender
                announced = True
                if abort_when_live:
                    for transfer_id in expected:
                        receiver.abort(transfer_id, "client cancelled")
        for release_at, owner in [h for h in held if h[0] <= time.monotonic()]:
            assert block_manager.release(owner)
            held.remove((release_at, owner))
        if idle and not held and (len(done) == len(expected) or all_failed):
            break  # all ended, or every pair is gone and nothing more can arrive
        time.sleep(0.005)
    for transfer_id in expected:
        result = next((r.result(transfer_id) for r in receivers if r.result(transfer_id)), None)
        if result is not None:
            report.results[transfer_id] = (result.status.value, result.reason)
            report.seconds[transfer_id] = result.seconds
            report.steps[transfer_id] = [name for name, _ in result.timeline]
    if params.get("no_ack"):
        for receiver in receivers:  # the rogue cleans up after itself for the integrity check
            receiver.close()
    report.metrics = metrics_dict(metrics)
    report.integrity = integrity(block_manager)
    for receiver in receivers:
        receiver.close()
    report.integrity += " / after close: " + integrity(block_manager)


def sender_role(params: dict[str, Any], conn: Connection, report: Report) -> None:
    dtype = params.get("dtype", torch.float32)
    config: TransferConfig = params.get("config", TransferConfig())
    cache = kv_cache(SRC_BLOCKS, seed=params.get("seed", 5), dtype=dtype)
    block_manager = BlockManager(SRC_BLOCKS, BLOCK_SIZE, enable_prefix_caching=False)
    pool = StagingPool(1 << 22, "cpu", dtype, granularity_bytes=4096)
    metrics = TransferMetrics()
    senders = []
    for index, endpoint in enumerate(params["endpoints"]):
        channel, control = connect_pair(endpoint, f"{params['name']}/{index}", TRANSPORT)
        cls = _SlowAfterSendSender if params.get("slow_after_send") else KVSender
        senders.append(
            cls(channel, control, cache, layout_of(cache), block_manager.release, pool,
                config, metrics)
        )  # fmt: skip
    handles = []
    for spec in params["specs"]:
        sender = senders[spec.endpoint]
        blocks = source_blocks(spec)
        owner = f"out:{spec.transfer_id}"
        block_manager.hold(owner, blocks)
        report.digests[spec.transfer_id] = digest(cache, blocks)
        handles.append(
            sender.submit(
                spec.transfer_id, owner, blocks, spec.num_tokens,
                layers_per_chunk=spec.layers_per_chunk,
                chunk_ready=_behavior(spec, sender), transfer_id=spec.transfer_id,
            )
        )  # fmt: skip
    for handle in handles:
        result = handle.wait(params.get("deadline_s", 60.0))
        report.results[result.transfer_id] = (result.status.value, result.reason)
        report.seconds[result.transfer_id] = result.seconds
        report.steps[result.transfer_id] = [name for name, _ in result.timeline]
    report.metrics = metrics_dict(metrics)
    report.integrity = integrity(block_manager)
    for sender in senders:
        sender.close()


def _behavior(spec: Spec, sender: KVSender) -> Any:
    if spec.behavior == "slow":
        return lambda index: time.sleep(0.25)
    if spec.behavior == "abort_at_1":
        return lambda index: index == 1 and sender.abort(spec.transfer_id, "aborted by test")
    if spec.behavior == "stall_at_1":
        return lambda index: index == 1 and time.sleep(4.0)
    if spec.behavior == "busy_until_pair_fails":
        return lambda index: index == 0 and _wait_until(lambda: sender.control.closed, 30.0)
    return None


def _wait_until(condition: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


ROLES = {"receiver": receiver_role, "sender": sender_role}


# ---------------------------------------------------------------------------------------------
# Engines at both ends: a real prefill's KV, decoded on the other side


def engine_config(kv_cache_dtype: str = "auto") -> Any:
    from engine.config import EngineConfig
    from engine.scheduler import SchedulerConfig

    return EngineConfig(
        model="dummy:tiny",
        device="cpu",
        num_kv_blocks=64,
        block_size=4,
        seed=0,
        kv_cache_dtype=kv_cache_dtype,
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256),
    )


def prefill_engine_role(params: dict[str, Any], conn: Connection, report: Report) -> None:
    """Prefill every prompt (keep_kv), ship its KV, report the first tokens."""
    from contracts.sampling_params import SamplingParams
    from engine.engine import Engine, KeptKV

    engine = Engine(engine_config(params.get("kv_cache_dtype", "auto")))
    cache = engine.runner.kv_cache
    layout = KVLayout.of_cache(cache, engine.model_id, scales_digest=engine.kv_scales_digest)
    channel, control = connect_pair(params["endpoint"], "prefill/decode", TRANSPORT)
    sender = KVSender(
        channel, control, cache, layout,
        engine.block_manager.release, StagingPool(1 << 22, "cpu", cache.dtype),
    )  # fmt: skip
    handles = []
    for request_id, prompt in params["prompts"].items():
        engine.add_request(
            request_id, None, SamplingParams(max_tokens=1, temperature=0.0),
            prompt_token_ids=prompt, keep_kv=True,
        )  # fmt: skip
        while engine.has_unfinished_requests():
            for output in engine.step():
                report.results[request_id] = ("first_token", str(output.new_token_ids[0]))
        kept = engine.take_kept_kv(request_id)
        assert isinstance(kept, KeptKV), kept
        handles.append(
            sender.submit(request_id, kept.owner, kept.block_ids, kept.num_tokens,
                          layers_per_chunk=1, transfer_id=request_id)
        )  # fmt: skip
    conn.send({rid: int(token) for rid, (_, token) in report.results.items()})
    for handle in handles:
        assert handle.wait(60).ok
    report.integrity = integrity(engine.block_manager)
    sender.close()


def decode_engine_role(params: dict[str, Any], conn: Connection, report: Report) -> None:
    """Receive KV, continue each request from its first token, report the generated ids."""
    from contracts.sampling_params import SamplingParams
    from engine.engine import Engine

    engine = Engine(engine_config(params.get("kv_cache_dtype", "auto")))
    cache = engine.runner.kv_cache
    layout = KVLayout.of_cache(cache, engine.model_id, scales_digest=engine.kv_scales_digest)
    endpoint = ReceiverEndpoint(HOST)
    conn.send(endpoint.address)
    pair = endpoint.accept(TRANSPORT)
    assert pair is not None
    receiver = KVReceiver(
        pair[0], pair[1], cache, layout,
        engine.block_manager.reserve, engine.block_manager.release,
        StagingPool(1 << 22, "cpu", cache.dtype),
    )  # fmt: skip
    prompts: dict[str, list[int]] = params["prompts"]
    params_ = SamplingParams(max_tokens=params["max_tokens"], temperature=0.0, ignore_eos=True)
    first_tokens: dict[str, int] | None = None
    arrived = []
    tokens: dict[str, list[int]] = {}
    deadline = time.monotonic() + 60
    while len(tokens) < len(prompts) or engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "decode side timed out"
        if first_tokens is None and conn.poll():
            first_tokens = conn.recv()
        arrived += receiver.poll()  # never blocks: the decode loop keeps stepping
        while arrived and first_tokens is not None:
            kv = arrived.pop()
            first = first_tokens[kv.request_id]
            engine.add_transferred_request(
                kv.request_id, prompts[kv.request_id], first, params_, kv_owner=kv.owner
            )
            tokens[kv.request_id] = [first]
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
        if not engine.has_unfinished_requests():
            time.sleep(0.002)
    report.results = {rid: ("tokens", ",".join(map(str, ids))) for rid, ids in tokens.items()}
    report.integrity = integrity(engine.block_manager)
    receiver.close()


ROLES.update(prefill_engine=prefill_engine_role, decode_engine=decode_engine_role)

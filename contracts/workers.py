"""What the workers tell the control plane and the router about themselves.

`WorkerInfo` once, when a worker has started (what the router validates and places requests
against); `WorkerStats` at every health check (load for placement, counters for metrics, and
`failure` once its engine has stopped). Plain frozen data, picklable across Ray.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class WorkerKey:
    """One incarnation of a worker: its stable id and the epoch it drew at start."""

    worker_id: str
    epoch: str

    def __post_init__(self) -> None:
        for name in ("worker_id", "epoch"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _NAME.fullmatch(value):
                raise ValueError(f"{name}={value!r}: use 1-64 of [A-Za-z0-9_.-]")


def new_epoch() -> str:
    """A fresh incarnation id; a worker draws one when it starts (never reuse one)."""
    return uuid.uuid4().hex[:16]


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A started worker's model, as the router needs it to validate and place requests."""

    model_id: str
    model_spec: str | None  # what the worker was asked to load (None: the default model)
    vocab_size: int
    max_model_len: int
    block_size: int  # tokens per KV block: prompts are hashed per block of this size
    index_key: WorkerKey  # this incarnation's key in the prefix index


@dataclass(frozen=True, slots=True)
class KVTransferCounters:
    """A worker's KV-transfer figures since it started (every pair, live or retired)."""

    pairs: int = 0  # pairs formed and live now
    pairs_refused_by_reason: dict[str, int] = field(default_factory=dict)
    transfers_completed: int = 0
    transfers_failed: int = 0
    leases_expired: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    transfer_seconds: float = 0.0  # summed over completed transfers
    # Prompt KV shipped (prefill side: submitted) and attached (decode side), in tokens and
    # blocks; and, decode side, prompt tokens of transferred requests taken from this worker's
    # own prefix cache instead of shipped (decode-side prefix reuse).
    tokens_sent: int = 0
    blocks_sent: int = 0
    tokens_received: int = 0
    blocks_received: int = 0
    tokens_reused: int = 0
    # decode side: prompts computed again here because their KV did not come, by reason
    # (no_room, failed, aborted, timeout, pair_failed; decode_worker.kv_arrivals)
    prompts_recomputed_by_reason: dict[str, int] = field(default_factory=dict)
    # back-pressure of a bounded staging region (private-KV tensor parallelism): kept KV that
    # waited for staging blocks before it could ship (sending side), offers that found no
    # room and waited, and offers refused for no room after waiting (receiving side)
    kv_staging_waits: int = 0
    offers_deferred: int = 0
    offers_refused_for_room: int = 0

    @property
    def pairs_refused(self) -> int:
        return sum(self.pairs_refused_by_reason.values())


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """One health check's report. With `failure` set (the engine stopped, and why) only
    `num_requests` is meaningful: the worker is to be replaced."""

    num_requests: int  # requests the worker holds (queued, running, awaiting KV)
    failure: str | None = None
    num_running: int = 0
    num_waiting: int = 0
    num_preemptions: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    max_num_seqs: int = 0
    num_prompt_tokens_computed: int = 0  # prompt tokens this engine ran (prefilled), ever
    kv: KVTransferCounters = field(default_factory=KVTransferCounters)

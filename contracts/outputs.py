"""What a worker's engine produces for one request each step, as every part sees it.

`RequestOutput` travels from the engine through the worker's outbox to the router; the router
turns it into gRPC responses. Torch-free plain data, picklable across Ray.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the end of the context
    ABORT = "abort"  # cancelled by the caller


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    completion_tokens: int
    queue_seconds: float = 0.0  # arrival in this engine to the first schedule


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the top-n (token id, logprob), most likely first


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: tuple[int, ...]
    text_delta: str
    finished: bool
    finish_reason: FinishReason | None
    usage: Usage
    logprobs: tuple[TokenLogprobs, ...] = ()

"""Admission control: a bounded amount of work in flight, counted in requests and in prompt
tokens (RELIABILITY promise 7). Past either bound a request is refused at once with
Overloaded (gRPC RESOURCE_EXHAUSTED), before any worker sees it, so admitted requests keep
their latency instead of everyone slowing down together.

One instance per router, used from its event loop only (no locks needed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from engine.errors import Overloaded


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_requests: int = 256  # requests in flight, prefill and decode together
    max_prompt_tokens: int = 1 << 20  # prompt tokens of the requests in flight

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_prompt_tokens"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")


class Admission:
    def __init__(self, limits: AdmissionLimits | None = None) -> None:
        self.limits = limits or AdmissionLimits()
        self.requests = 0
        self.prompt_tokens = 0
        self.refused = 0

    @contextmanager
    def admit(self, prompt_tokens: int) -> Iterator[None]:
        """Hold a place for a request while the block runs; raises Overloaded (taking
        nothing) if it does not fit."""
        limits = self.limits
        if self.requests + 1 > limits.max_requests:
            self.refused += 1
            raise Overloaded(
                f"overloaded: {self.requests} requests in flight (limit {limits.max_requests})"
            )
        if self.prompt_tokens + prompt_tokens > limits.max_prompt_tokens:
            self.refused += 1
            raise Overloaded(
                f"overloaded: {self.prompt_tokens} prompt tokens in flight, this request "
                f"{prompt_tokens} (limit {limits.max_prompt_tokens})"
            )
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        try:
            yield
        finally:
            self.requests -= 1
            self.prompt_tokens -= prompt_tokens

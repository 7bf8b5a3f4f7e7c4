"""Admission control: a bounded amount of work in flight, counted in requests, prompt tokens
and request bytes. Past any bound a request is refused at once with Overloaded (gRPC
RESOURCE_EXHAUSTED), before any worker sees it, so admitted requests keep their latency instead
of everyone slowing down together.

Two steps: by count and size on arrival, before tokenizing (a flood of big prompts costs no
tokenizer time), then by prompt tokens once they are known (`Ticket.add_prompt_tokens`);
tokenize calls take the first step only. One instance per router, on its event loop only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from contracts.errors import Overloaded


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_requests: int = 256  # requests in flight, prefill and decode together
    max_prompt_tokens: int = 1 << 20  # prompt tokens of the requests in flight
    max_request_bytes: int = 64 << 20  # serialized size of the requests in flight

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_prompt_tokens", "max_request_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")


class Ticket:
    """One admitted request's place; its prompt tokens are added once known."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.prompt_tokens = 0

    def add_prompt_tokens(self, prompt_tokens: int) -> None:
        """Count the request's prompt tokens; raises Overloaded (adding nothing) if they do
        not fit."""
        admission, limits = self._admission, self._admission.limits
        if admission.prompt_tokens + prompt_tokens > limits.max_prompt_tokens:
            admission.refused += 1
            raise Overloaded(
                f"overloaded: {admission.prompt_tokens} prompt tokens in flight, this request "
                f"{prompt_tokens} (limit {limits.max_prompt_tokens})"
            )
        admission.prompt_tokens += prompt_tokens
        self.prompt_tokens += prompt_tokens


class Admission:
    def __init__(self, limits: AdmissionLimits | None = None) -> None:
        self.limits = limits or AdmissionLimits()
        self.requests = 0
        self.prompt_tokens = 0
        self.request_bytes = 0
        self.refused = 0

    @contextmanager
    def admit(self, prompt_tokens: int = 0, request_bytes: int = 0) -> Iterator[Ticket]:
        """Hold a place for a request while the block runs; raises Overloaded (taking
        nothing) if it does not fit. Yields its Ticket (more prompt tokens may be added)."""
        limits = self.limits
        if self.requests + 1 > limits.max_requests:
            self.refused += 1
            raise Overloaded(
                f"overloaded: {self.requests} requests in flight (limit {limits.max_requests})"
            )
        if self.request_bytes + request_bytes > limits.max_request_bytes:
            self.refused += 1
            raise Overloaded(
                f"overloaded: {self.request_bytes} request bytes in flight, this request "
                f"{request_bytes} (limit {limits.max_request_bytes})"
            )
        ticket = Ticket(self)
        ticket.add_prompt_tokens(prompt_tokens)
        self.requests += 1
        self.request_bytes += request_bytes
        try:
            yield ticket
        finally:
            self.requests -= 1
            self.request_bytes -= request_bytes
            self.prompt_tokens -= ticket.prompt_tokens

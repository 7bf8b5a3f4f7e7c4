"""Admission control: a bounded amount of work in flight, counted in requests, prompt tokens
and request bytes. Past any bound a request is refused at once with Overloaded (gRPC
RESOURCE_EXHAUSTED), before any worker sees it, so admitted requests keep their latency instead
of everyone slowing down together.

Two steps: by count and size on arrival, before tokenizing (a flood of big prompts costs no
tokenizer time), then by prompt tokens once they are known (`Ticket.add_prompt_tokens`);
tokenize calls take the first step only. One instance per router, on its event loop only.

The prompt-token bound is `max_prompt_tokens` when given; by default it follows the KV capacity
of the pool that holds the prompts of running requests (`kv_capacity_tokens`, read at each
admission: the decode pool's KV blocks x block size, as the workers last reported them), so it
grows and shrinks with the pool; until a worker has reported, DEFAULT_MAX_PROMPT_TOKENS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from contracts.errors import Overloaded

DEFAULT_MAX_PROMPT_TOKENS = 1 << 20  # while the KV capacity is not known


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_requests: int = 256  # requests in flight, prefill and decode together
    # prompt tokens of the requests in flight; None: the KV capacity (see the module docstring)
    max_prompt_tokens: int | None = None
    max_request_bytes: int = 64 << 20  # serialized size of the requests in flight

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_prompt_tokens", "max_request_bytes"):
            value = getattr(self, name)
            if value is None and name == "max_prompt_tokens":
                continue
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
        admission = self._admission
        limit, source = admission.prompt_token_limit()
        if admission.prompt_tokens + prompt_tokens > limit:
            admission.refused += 1
            raise Overloaded(
                f"overloaded: {admission.prompt_tokens} prompt tokens in flight, this request "
                f"{prompt_tokens} (limit {limit}{source})"
            )
        admission.prompt_tokens += prompt_tokens
        self.prompt_tokens += prompt_tokens


class Admission:
    def __init__(
        self,
        limits: AdmissionLimits | None = None,
        kv_capacity_tokens: Callable[[], int] | None = None,
    ) -> None:
        """kv_capacity_tokens: the prompt-token bound when limits give none (0: not known)."""
        self.limits = limits or AdmissionLimits()
        self.kv_capacity_tokens = kv_capacity_tokens
        self.requests = 0
        self.prompt_tokens = 0
        self.request_bytes = 0
        self.refused = 0

    def prompt_token_limit(self) -> tuple[int, str]:
        """The prompt-token bound now, and where it comes from (for the refusal's message)."""
        if self.limits.max_prompt_tokens is not None:
            return self.limits.max_prompt_tokens, ""
        capacity = self.kv_capacity_tokens() if self.kv_capacity_tokens is not None else 0
        if capacity > 0:
            return capacity, ": the decode pool's KV capacity"
        return DEFAULT_MAX_PROMPT_TOKENS, ""

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

"""Per-request sampling parameters and their validation.

Torch-free: the router validates requests with the same code before they reach a worker.
`validate(vocab_size)` is the one place that knows what a legal parameter set is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from contracts.errors import InvalidRequest

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024  # entries; a bias over the whole vocabulary is refused


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. Defaults: greedy, 16 tokens."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # HF semantics: over prompt and output tokens
    frequency_penalty: float = 0.0  # OpenAI semantics: over output tokens
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; n >= 0: chosen token plus top-n
    logit_bias: tuple[tuple[int, float], ...] = field(default=())
    skip_special_tokens: bool = True

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidRequest naming the first bad field."""
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_float("temperature", self.temperature, low=0.0, high=100.0)
        _check_int("top_k", self.top_k, low=0, high=vocab_size)
        _check_float("top_p", self.top_p, low=0.0, high=1.0, low_inclusive=False)
        _check_float("min_p", self.min_p, low=0.0, high=1.0)
        _check_float(
            "repetition_penalty", self.repetition_penalty, low=0.0, high=10.0, low_inclusive=False
        )
        _check_float("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _check_float("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=2**63 - 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_TOP_LOGPROBS)
        _check_sequence("stop", self.stop)
        _check_stop(self.stop)
        _check_sequence("stop_token_ids", self.stop_token_ids)
        check_count("stop_token_ids", len(self.stop_token_ids), MAX_STOP_TOKEN_IDS)
        for token_id in self.stop_token_ids:
            check_token_id("stop_token_ids", token_id, vocab_size)
        _check_sequence("logit_bias", self.logit_bias)
        check_count("logit_bias", len(self.logit_bias), MAX_LOGIT_BIAS)
        for pair in self.logit_bias:
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise InvalidRequest(
                    "logit_bias", f"entries must be (token_id, bias), got {pair!r}"
                )
            check_token_id("logit_bias", pair[0], vocab_size)
            _check_float("logit_bias", pair[1], low=-100.0, high=100.0)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(name, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidRequest(name, f"must be {bound}, got {value}")


def _check_float(
    name: str, value: object, low: float, high: float, low_inclusive: bool = True
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(name, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidRequest(name, f"must be finite, got {value}")
    too_low = value < low if low_inclusive else value <= low
    if too_low or value > high:
        opening = "[" if low_inclusive else "("
        raise InvalidRequest(name, f"must be in {opening}{low}, {high}], got {value}")


def check_count(name: str, count: int, limit: int) -> None:
    """Refuse a repeated field with more than `limit` entries, naming both."""
    if count > limit:
        raise InvalidRequest(name, f"at most {limit} entries, got {count}")


def _check_sequence(name: str, value: object) -> None:
    if not isinstance(value, tuple | list):
        raise InvalidRequest(name, f"must be a list, got {type(value).__name__}")


def check_token_id(name: str, token_id: object, vocab_size: int) -> None:
    if isinstance(token_id, bool) or not isinstance(token_id, int):
        raise InvalidRequest(name, f"token id must be an integer, got {token_id!r}")
    if not 0 <= token_id < vocab_size:
        raise InvalidRequest(
            name, f"token id {token_id} is outside the vocabulary [0, {vocab_size})"
        )


def _check_stop(stop: tuple[str, ...]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InvalidRequest("stop", f"stop strings must be non-empty strings, got {s!r}")
        if len(s) > MAX_STOP_STRING_CHARS:
            raise InvalidRequest("stop", f"stop string longer than {MAX_STOP_STRING_CHARS} chars")


def validate_prompt_token_ids(
    token_ids: list[int], vocab_size: int, max_model_len: int, max_tokens: int
) -> None:
    """Check a tokenized prompt against the model: non-empty, in vocabulary, fits the context.

    Generation that reaches the end of the context stops with finish reason "length"; a
    `max_tokens` larger than the whole context is refused as nonsense.
    """
    if not token_ids:
        raise InvalidRequest("prompt", "prompt is empty")
    plain = set(map(type, token_ids)) == {int} and 0 <= min(token_ids) <= max(token_ids)
    if not (plain and max(token_ids) < vocab_size):  # C-speed check first; then find the bad
        for token_id in token_ids:
            check_token_id("prompt_token_ids", token_id, vocab_size)
    if len(token_ids) >= max_model_len:
        raise InvalidRequest(
            "prompt",
            f"prompt has {len(token_ids)} tokens; the context is {max_model_len} tokens and "
            "at least one must be left to generate",
        )
    if max_tokens > max_model_len:
        raise InvalidRequest(
            "max_tokens", f"must be <= the context length {max_model_len}, got {max_tokens}"
        )

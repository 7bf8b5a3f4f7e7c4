"""What a run sends: sessions of requests built from a seed and the served model's vocabulary.

A Session is one request, or for multi-turn conversations several sent one after another, each
turn's prompt being the previous prompt, its answer and a new question (`next_prompt`). The
workloads: random lengths (token ids, exact counts), shared-prefix groups, multi-turn
conversations (chat messages or token ids) and a prefill-heavy/decode-heavy mix. Every request
asks for exactly `max_tokens` tokens (the client sets ignore_eos). Pure: no I/O, same seed same
sessions.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

# Short common words for multi-turn questions sent as chat text (most are one token each).
WORDS = (  # noqa: SIM905 (a word list reads better as one string)
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which she "
    "do how their if will up other about out many then them these so some her would make like "
    "him into time has look two more write go see number no way could people my than first water"
).split()


@dataclass(frozen=True, slots=True)
class Prompt:
    """Exactly one of: token ids (sent as is), chat messages (role, content), or text."""

    token_ids: tuple[int, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()
    text: str = ""

    def __post_init__(self) -> None:
        given = sum(map(bool, (self.token_ids, self.messages, self.text)))
        if given != 1:
            raise ValueError(f"Prompt needs exactly one of token_ids, messages, text; got {given}")


@dataclass(frozen=True, slots=True)
class Answer:
    """What the server streamed back for one request."""

    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True, slots=True)
class Session:
    """Requests sent back to back: `prompt` first, then one per follow-up question."""

    label: str  # the first request's label; follow-up k is labelled turn-(k + 2)
    prompt: Prompt
    max_tokens: int
    follow_ups: tuple[Prompt, ...] = ()

    @property
    def num_requests(self) -> int:
        return 1 + len(self.follow_ups)


def next_prompt(previous: Prompt, answer: Answer, question: Prompt) -> Prompt:
    """The next turn of a conversation: the previous prompt, its answer, the new question."""
    if previous.token_ids:
        return Prompt(token_ids=previous.token_ids + answer.token_ids + question.token_ids)
    if previous.messages:
        return Prompt(messages=(*previous.messages, ("assistant", answer.text), *question.messages))
    return Prompt(text=previous.text + answer.text + question.text)


class Workload(Protocol):
    """A recipe for sessions (a frozen dataclass: its fields are its configuration);
    `max_total_tokens` bounds any request's prompt + output."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def name(self) -> str: ...

    def sessions(self, num_sessions: int, vocab_size: int, seed: int) -> list[Session]: ...

    def max_total_tokens(self) -> int: ...


def random_ids(rng: random.Random, vocab_size: int, length: int) -> tuple[int, ...]:
    return tuple(rng.choices(range(vocab_size), k=length))


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """The inclusive range of lengths around `length`: [l * (1 - r), l * (1 + r)], at least 1."""
    low = max(1, math.floor(length * (1 - range_ratio)))
    return low, max(low, math.ceil(length * (1 + range_ratio)))


def _check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{owner}.{name} must be at least 1, got {value}")


@dataclass(frozen=True, slots=True)
class RandomWorkload:
    """Random token ids; lengths uniform in length_range(input_len / output_len, range_ratio)."""

    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    name: ClassVar[str] = "random"

    def __post_init__(self) -> None:
        _check_positive("RandomWorkload", input_len=self.input_len, output_len=self.output_len)
        if not 0 <= self.range_ratio < 1:
            raise ValueError(
                f"RandomWorkload.range_ratio must be in [0, 1), got {self.range_ratio}"
            )

    def sessions(self, num_sessions: int, vocab_size: int, seed: int) -> list[Session]:
        rng = random.Random(seed)
        sessions = []
        for _ in range(num_sessions):
            num_input = rng.randint(*length_range(self.input_len, self.range_ratio))
            num_output = rng.randint(*length_range(self.output_len, self.range_ratio))
            prompt = Prompt(token_ids=random_ids(rng, vocab_size, num_input))
            sessions.append(Session(self.name, prompt, num_output))
        return sessions

    def max_total_tokens(self) -> int:
        return (
            length_range(self.input_len, self.range_ratio)[1]
            + length_range(self.output_len, self.range_ratio)[1]
        )


@dataclass(frozen=True, slots=True)
class SharedPrefixWorkload:
    """`num_groups` random prefixes of `prefix_len` tokens; session i uses group i % num_groups
    and a random suffix of `suffix_len` tokens of its own."""

    num_groups: int = 4
    prefix_len: int = 1024
    suffix_len: int = 32
    output_len: int = 128
    name: ClassVar[str] = "shared-prefix"

    def __post_init__(self) -> None:
        _check_positive(
            "SharedPrefixWorkload",
            num_groups=self.num_groups,
            prefix_len=self.prefix_len,
            suffix_len=self.suffix_len,
            output_len=self.output_len,
        )

    def sessions(self, num_sessions: int, vocab_size: int, seed: int) -> list[Session]:
        rng = random.Random(seed)
        prefixes = [random_ids(rng, vocab_size, self.prefix_len) for _ in range(self.num_groups)]
        sessions = []
        for index in range(num_sessions):
            suffix = random_ids(rng, vocab_size, self.suffix_len)
            prompt = Prompt(token_ids=prefixes[index % self.num_groups] + suffix)
            sessions.append(Session(self.name, prompt, self.output_len))
        return sessions

    def max_total_tokens(self) -> int:
        return self.prefix_len + self.suffix_len + self.output_len


@dataclass(frozen=True, slots=True)
class MultiTurnWorkload:
    """Conversations of `num_turns` turns; each question has `question_len` words (chat) or
    token ids (token-ids), each answer `output_len` tokens."""

    num_turns: int = 3
    question_len: int = 32
    output_len: int = 64
    prompt_format: Literal["chat", "token-ids"] = "chat"
    name: ClassVar[str] = "multi-turn"

    def __post_init__(self) -> None:
        _check_positive(
            "MultiTurnWorkload",
            num_turns=self.num_turns,
            question_len=self.question_len,
            output_len=self.output_len,
        )
        if self.prompt_format not in ("chat", "token-ids"):
            raise ValueError(f"MultiTurnWorkload.prompt_format: {self.prompt_format!r}")

    def sessions(self, num_sessions: int, vocab_size: int, seed: int) -> list[Session]:
        rng = random.Random(seed)
        sessions = []
        for _ in range(num_sessions):
            first, *rest = (self._question(rng, vocab_size) for _ in range(self.num_turns))
            sessions.append(Session("turn-1", first, self.output_len, tuple(rest)))
        return sessions

    def _question(self, rng: random.Random, vocab_size: int) -> Prompt:
        if self.prompt_format == "token-ids":
            return Prompt(token_ids=random_ids(rng, vocab_size, self.question_len))
        words = rng.choices(WORDS, k=self.question_len)
        return Prompt(messages=(("user", " ".join(words).capitalize() + "?"),))

    def max_total_tokens(self) -> int:
        """Token ids exactly; chat as about one token per word, before the chat template."""
        return self.num_turns * (self.question_len + self.output_len)


@dataclass(frozen=True, slots=True)
class MixedWorkload:
    """Prefill-heavy (long input, short output) and decode-heavy (short input, long output)
    requests; exactly round(num * prefill_heavy_fraction) of them prefill-heavy, in a seeded
    random order."""

    prefill_heavy_fraction: float = 0.5
    prefill_heavy_lens: tuple[int, int] = (1024, 16)  # (input, output) tokens
    decode_heavy_lens: tuple[int, int] = (64, 256)
    name: ClassVar[str] = "mixed"

    def __post_init__(self) -> None:
        if not 0 <= self.prefill_heavy_fraction <= 1:
            raise ValueError(
                "MixedWorkload.prefill_heavy_fraction must be in [0, 1], "
                f"got {self.prefill_heavy_fraction}"
            )
        for field in ("prefill_heavy_lens", "decode_heavy_lens"):
            if min(getattr(self, field)) < 1:
                raise ValueError(
                    f"MixedWorkload.{field} must be positive, got {getattr(self, field)}"
                )

    def sessions(self, num_sessions: int, vocab_size: int, seed: int) -> list[Session]:
        rng = random.Random(seed)
        num_prefill_heavy = round(num_sessions * self.prefill_heavy_fraction)
        kinds = [True] * num_prefill_heavy + [False] * (num_sessions - num_prefill_heavy)
        rng.shuffle(kinds)
        sessions = []
        for is_prefill_heavy in kinds:
            label = "prefill-heavy" if is_prefill_heavy else "decode-heavy"
            num_input, num_output = (
                self.prefill_heavy_lens if is_prefill_heavy else self.decode_heavy_lens
            )
            prompt = Prompt(token_ids=random_ids(rng, vocab_size, num_input))
            sessions.append(Session(label, prompt, num_output))
        return sessions

    def max_total_tokens(self) -> int:
        return max(sum(self.prefill_heavy_lens), sum(self.decode_heavy_lens))


def workload_from_args(args: Any) -> Workload:
    """The workload the flags describe; ValueError naming a bad value."""
    if args.workload == "random":
        return RandomWorkload(args.input_len, args.output_len, args.range_ratio)
    if args.workload == "shared-prefix":
        return SharedPrefixWorkload(
            args.num_groups, args.prefix_len, args.suffix_len, args.output_len
        )
    if args.workload == "multi-turn":
        return MultiTurnWorkload(
            args.num_turns, args.question_len, args.output_len, args.multi_turn_format
        )
    if args.workload == "mixed":
        return MixedWorkload(
            args.prefill_heavy_fraction, args.prefill_heavy_lens, args.decode_heavy_lens
        )
    raise ValueError(f"unknown workload {args.workload!r}")

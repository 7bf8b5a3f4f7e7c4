"""From a `tandem.v1.GenerateRequest` to what a worker runs: prompt token ids and validated
sampling parameters, or an InvalidRequest naming the first bad field (docs/reliability.md, I1..I9).

Everything a client sends is checked here, against the served model, before any worker sees
it: the input (exactly one of text, chat, token ids; non-empty; in the vocabulary; fitting the
context), every sampling parameter (contracts.sampling_params.SamplingParams.validate, the same
code the engine runs), the model name and the id lengths. Every repeated field and string is
counted against its cap before it is converted or tokenized (`check_sizes`), so an oversized
request costs the router nothing but the check. Torch-free.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from contracts.chat import ChatMessage
from contracts.errors import InvalidRequest, ModelNotFound
from contracts.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
    check_count,
    validate_prompt_token_ids,
)
from proto.tandem.v1 import tandem_pb2 as pb

MAX_REQUEST_ID_BYTES = 128
MAX_CACHE_SALT_BYTES = 256
MAX_MODEL_NAME_BYTES = 256
MAX_CHAT_MESSAGES = 1024
MAX_CHAT_ROLE_CHARS = 64
MAX_PROMPT_CHARS = 4 << 20  # text longer than this is refused before tokenizing


class PromptTokenizer(Protocol):
    """What the router needs of a tokenizer (engine.tokenizer.Tokenizer is one)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any] | ChatMessage],
        add_generation_prompt: bool = True,
    ) -> str: ...

    @property
    def has_chat_template(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class ServedModel:
    """The served model as the router knows it."""

    model_id: str
    vocab_size: int
    max_model_len: int
    tokenizer: PromptTokenizer | None
    block_size: int = 16  # the workers' KV block size: prompts hash per block of this size
    max_prompt_chars: int = MAX_PROMPT_CHARS  # longer text is refused untokenized


@dataclass(frozen=True, slots=True)
class ValidatedRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None
    # A replay after a lost worker (router.failover): the output tokens already streamed.
    resumed_token_ids: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        """The tokens a worker computes before it samples: the prompt and resumed ones."""
        return len(self.prompt_token_ids) + len(self.resumed_token_ids)


def validate_generate_request(request: Any, model: ServedModel) -> ValidatedRequest:
    """Check and convert a GenerateRequest; raises InvalidRequest (ModelNotFound for a model
    that is not served) naming the first bad field."""
    check_sizes(request, model)
    if request.model and request.model != model.model_id:
        raise ModelNotFound(request.model, [model.model_id])
    request_id = request.request_id or uuid.uuid4().hex
    params = sampling_params_from_proto(request.sampling)
    params.validate(model.vocab_size)
    prompt = prompt_token_ids(request, model)
    validate_prompt_token_ids(prompt, model.vocab_size, model.max_model_len, params.max_tokens)
    return ValidatedRequest(request_id, prompt, params, request.cache_salt or None)


def check_sizes(request: Any, model: ServedModel) -> None:
    """Refuse a GenerateRequest or TokenizeRequest whose strings or repeated fields exceed
    their caps, naming the field and the limit, without converting or tokenizing anything."""
    _check_utf8_length("model", request.model, MAX_MODEL_NAME_BYTES)
    if isinstance(request, pb.GenerateRequest):
        _check_utf8_length("request_id", request.request_id, MAX_REQUEST_ID_BYTES)
        _check_utf8_length("cache_salt", request.cache_salt, MAX_CACHE_SALT_BYTES)
        sampling = request.sampling
        check_count("stop", len(sampling.stop), MAX_STOP_STRINGS)
        check_count("stop_token_ids", len(sampling.stop_token_ids), MAX_STOP_TOKEN_IDS)
        check_count("logit_bias", len(sampling.logit_bias), MAX_LOGIT_BIAS)
    kind = request.WhichOneof("input")
    if kind == "token_ids" and len(request.token_ids.ids) >= model.max_model_len:
        raise InvalidRequest(
            "prompt", f"prompt has {len(request.token_ids.ids)} tokens; the context is "
            f"{model.max_model_len} tokens and at least one must be left to generate",
        )  # fmt: skip
    if kind == "text" and len(request.text) > model.max_prompt_chars:
        raise InvalidRequest(
            "text", f"longer than {model.max_prompt_chars} characters, more than the "
            f"{model.max_model_len}-token context can hold",
        )  # fmt: skip
    if kind == "chat":
        _check_chat_sizes(request.chat.messages, model)


def _check_chat_sizes(messages: Sequence[Any], model: ServedModel) -> None:
    if len(messages) > MAX_CHAT_MESSAGES:
        raise InvalidRequest("chat", f"more than {MAX_CHAT_MESSAGES} messages")
    for message in messages:
        if len(message.role) > MAX_CHAT_ROLE_CHARS:
            raise InvalidRequest(
                "chat", f"a role is {len(message.role)} characters, limit {MAX_CHAT_ROLE_CHARS}"
            )
    if sum(len(m.role) + len(m.content) for m in messages) > model.max_prompt_chars:
        raise InvalidRequest(
            "chat", f"roles and contents longer than {model.max_prompt_chars} characters, "
            f"more than the {model.max_model_len}-token context can hold",
        )  # fmt: skip


def prompt_chars_limit(max_model_len: int, max_token_chars: int) -> int:
    """The longest text prompt worth tokenizing: twice what `max_model_len` tokens of at most
    `max_token_chars` characters each can spell (the margin: normalization may merge
    characters), within MAX_PROMPT_CHARS. Anything longer cannot fit the context."""
    return min(MAX_PROMPT_CHARS, 2 * max_model_len * max_token_chars)


def prompt_token_ids(request: Any, model: ServedModel) -> list[int]:
    """The prompt of a GenerateRequest or TokenizeRequest as token ids (after check_sizes).
    Tokenizing may take a while: call it off the event loop."""
    check_sizes(request, model)
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("input", "give one of text, chat or token_ids")
    if kind == "token_ids":
        return list(request.token_ids.ids)
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise InvalidRequest(kind, f"model {model.model_id} has no tokenizer; send token_ids")
    if kind == "text":
        if not request.text:
            raise InvalidRequest("text", "prompt is empty")
        return tokenizer.encode(request.text)
    messages = list(request.chat.messages)
    if not messages:
        raise InvalidRequest("chat", "no messages")
    chat = [ChatMessage(role=m.role, content=m.content) for m in messages]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def sampling_params_from_proto(sampling: Any) -> SamplingParams:
    """SamplingParameters -> SamplingParams; unset fields keep the engine's defaults. Values
    are checked by SamplingParams.validate (the engine's own rules), not here."""
    values: dict[str, Any] = {}
    for name in (
        "max_tokens",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "seed",
        "repetition_penalty",
        "frequency_penalty",
        "presence_penalty",
        "logprobs",
        "skip_special_tokens",
    ):
        if sampling.HasField(name):
            values[name] = getattr(sampling, name)
    return SamplingParams(
        **values,
        stop=tuple(sampling.stop),
        stop_token_ids=tuple(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        logit_bias=tuple(sorted(sampling.logit_bias.items())),
    )


def _check_utf8_length(field: str, value: str, limit: int) -> None:
    if len(value) > limit:  # at least as many bytes: refused without encoding it all
        raise InvalidRequest(field, f"is over {limit} UTF-8 bytes, limit {limit}")
    size = len(value.encode("utf-8"))
    if size > limit:
        raise InvalidRequest(field, f"is {size} UTF-8 bytes, limit {limit}")

"""The OpenAI API's request and response shapes over Tandem's: a `/v1/completions` or
`/v1/chat/completions` JSON body as router.core's `Incoming`, and its replies as OpenAI JSON.

A body becomes what the gRPC edge would have built: the prompt as a GenerateRequest (so the
same size caps, tokenizing and error texts apply: router.requests), the sampling fields as
contracts' SamplingParams, checked by its `validate` (the engine's own rules, the same texts).
OpenAI's defaults, not Tandem's, where they differ: temperature 1; a chat request without
`max_tokens` runs to the end of the context. Fields Tandem does not serve are refused naming
the field (`n` > 1, `echo`, `suffix`, `best_of` > 1, tools); unknown fields are
ignored, as OpenAI-compatible servers do. Errors are OpenAI's error JSON (`error_body`), with
the HTTP status of their canonical status (`HTTP_STATUS`). Torch-free; no web framework here.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from typing import Any

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
from router.core import Reply, Status, status_of_error
from router.requests import (
    MAX_CACHE_SALT_BYTES,
    ServedModel,
    ValidatedRequest,
    _check_utf8_length,
    check_sizes,
    prompt_token_ids,
)

COMPLETION = "completion"
CHAT = "chat"

# The HTTP status of each canonical status (router.core.Status).
HTTP_STATUS = {
    Status.OK: 200,
    Status.CANCELLED: 499,
    Status.UNKNOWN: 500,
    Status.INVALID_ARGUMENT: 400,
    Status.DEADLINE_EXCEEDED: 504,
    Status.NOT_FOUND: 404,
    Status.ALREADY_EXISTS: 409,
    Status.PERMISSION_DENIED: 403,
    Status.RESOURCE_EXHAUSTED: 429,
    Status.FAILED_PRECONDITION: 409,
    Status.INTERNAL: 500,
    Status.UNAVAILABLE: 503,
    Status.UNAUTHENTICATED: 401,
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}

# Sampling fields sent under the same name and meaning in both APIs (the rest of Tandem's
# are accepted too, as vLLM-style extensions: top_k, min_p, repetition_penalty, ...).
_SAME_NAMED = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "ignore_eos",
    "skip_special_tokens",
)
OPENAI_TEMPERATURE = 1.0  # OpenAI's default (Tandem's own API defaults to greedy)


def error_body(error: BaseException, http_status: int | None = None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error JSON) of an error: a TandemError by its canonical status."""
    status = http_status or HTTP_STATUS[status_of_error(error)]
    param = error.field if isinstance(error, InvalidRequest) else None
    code = "model_not_found" if isinstance(error, ModelNotFound) else None
    kind = _ERROR_TYPES.get(status, "server_error")
    return status, {"error": {"message": str(error), "type": kind, "param": param, "code": code}}


class OpenAIRequest:
    """One completion or chat completion body as router.core's Incoming. `check_sizes` parses
    it (cheap shape checks and the size caps); `validate` tokenizes and checks the values."""

    def __init__(self, kind: str, body: bytes, request_id: str | None = None) -> None:
        assert kind in (COMPLETION, CHAT), kind
        self.kind = kind
        self.body = body
        self.request_id = (
            request_id or f"{'chatcmpl' if kind == CHAT else 'cmpl'}-{uuid.uuid4().hex}"
        )
        self.created = int(time.time())
        self.stream = False
        self.include_usage = False
        self.model_name = ""
        self._prompt: Any = None  # a GenerateRequest holding the prompt, or a token id list
        self._values: dict[str, Any] = {}
        self._cache_salt: str | None = None
        self._text_offset = 0  # completions' logprobs: where the next token's text starts

    @property
    def request_bytes(self) -> int:
        return len(self.body)

    def check_sizes(self, model: ServedModel) -> None:
        fields = parse_json_object(self.body)
        self.model_name = _optional(fields, "model", str) or ""
        self.stream = bool(_optional(fields, "stream", bool))
        options = _optional(fields, "stream_options", dict) or {}
        self.include_usage = bool(_optional(options, "include_usage", bool, "stream_options."))
        _refuse_unserved(fields, self.kind)
        salt = _optional(fields, "cache_salt", str)
        if salt is not None:
            _check_utf8_length("cache_salt", salt, MAX_CACHE_SALT_BYTES)
        self._cache_salt = salt or None
        self._values = self._sampling_values(fields)
        if self.kind == CHAT:
            request = pb.GenerateRequest(model=self.model_name, chat=_chat(fields))
        else:
            prompt = _completion_prompt(fields)
            if isinstance(prompt, list):  # token ids: checked in validate, as on gRPC
                self._prompt = prompt
                request = pb.GenerateRequest(model=self.model_name)
            else:
                request = pb.GenerateRequest(model=self.model_name, text=prompt)
        check_sizes(request, model)
        if self._prompt is None:
            self._prompt = request

    def _sampling_values(self, fields: dict[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = {"temperature": OPENAI_TEMPERATURE}
        for name in _SAME_NAMED:
            if fields.get(name) is not None:
                values[name] = fields[name]
        max_tokens = fields.get("max_tokens")
        if self.kind == CHAT and fields.get("max_completion_tokens") is not None:
            max_tokens = fields["max_completion_tokens"]
        if max_tokens is not None:
            values["max_tokens"] = max_tokens
        stop = fields.get("stop")
        if stop is not None:
            stop = (stop,) if isinstance(stop, str) else stop
            if isinstance(stop, list):
                check_count("stop", len(stop), MAX_STOP_STRINGS)
                stop = tuple(stop)
            values["stop"] = stop
        stop_ids = fields.get("stop_token_ids")
        if stop_ids is not None:
            if isinstance(stop_ids, list):
                check_count("stop_token_ids", len(stop_ids), MAX_STOP_TOKEN_IDS)
                stop_ids = tuple(stop_ids)
            values["stop_token_ids"] = stop_ids
        logprobs = _logprobs(fields, self.kind)
        if logprobs is not None:
            values["logprobs"] = logprobs
        bias = _optional(fields, "logit_bias", dict)
        if bias is not None:
            check_count("logit_bias", len(bias), MAX_LOGIT_BIAS)
            values["logit_bias"] = tuple(sorted((_token_id_key(k), v) for k, v in bias.items()))
        return values

    def validate(self, model: ServedModel) -> ValidatedRequest:
        if self.model_name and self.model_name != model.model_id:
            raise ModelNotFound(self.model_name, [model.model_id])
        params = SamplingParams(**self._values)
        params.validate(model.vocab_size)
        if isinstance(self._prompt, list):
            prompt = self._prompt
        else:
            prompt = prompt_token_ids(self._prompt, model)
        if self.kind == CHAT and "max_tokens" not in self._values:  # OpenAI: to the context end
            params = replace(params, max_tokens=max(1, model.max_model_len - len(prompt)))
        validate_prompt_token_ids(prompt, model.vocab_size, model.max_model_len, params.max_tokens)
        return ValidatedRequest(self.request_id, prompt, params, self._cache_salt)

    # Responses ----------------------------------------------------------------------------

    def _envelope(self, model: ServedModel, chunk: bool) -> dict[str, Any]:
        if self.kind == CHAT:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created,
                "model": model.model_id}  # fmt: skip

    def chunk(self, model: ServedModel, reply: Reply, first: bool) -> dict[str, Any]:
        """The streamed chunk of one reply."""
        output = reply.output
        reason = output.finish_reason.value if output.finished and output.finish_reason else None
        choice: dict[str, Any] = {"index": 0}
        logprobs = self._logprobs(model, [reply])
        if self.kind == CHAT:
            delta: dict[str, Any] = {"content": output.text_delta}
            if first:
                delta = {"role": "assistant", **delta}
            choice.update(delta=delta, logprobs=logprobs, finish_reason=reason)
        else:
            choice.update(text=output.text_delta, logprobs=logprobs, finish_reason=reason)
        body = {**self._envelope(model, chunk=True), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, model: ServedModel, last: Reply) -> dict[str, Any]:
        """The chunk after the last (stream_options.include_usage): no choices, the usage."""
        return {**self._envelope(model, chunk=True), "choices": [], "usage": usage_of(last)}

    def response(self, model: ServedModel, replies: list[Reply]) -> dict[str, Any]:
        """The whole (non-streamed) response of a request's replies."""
        text = "".join(r.output.text_delta for r in replies)
        last = replies[-1].output
        reason = last.finish_reason.value if last.finish_reason else None
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(model, replies),
                                  "finish_reason": reason}  # fmt: skip
        if self.kind == CHAT:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._envelope(model, chunk=False), "choices": [choice],
                "usage": usage_of(replies[-1])}  # fmt: skip

    def _logprobs(self, model: ServedModel, replies: list[Reply]) -> dict[str, Any] | None:
        """OpenAI's logprobs of the replies' tokens (None unless asked for): completions'
        tokens / token_logprobs / top_logprobs / text_offset, or chat's `content` list."""
        if "logprobs" not in self._values:
            return None
        entries = [lp for reply in replies for lp in reply.output.logprobs]
        if self.kind == CHAT:
            return {"content": [
                {**_token_entry(model, lp.token_id, lp.logprob),
                 "top_logprobs": [_token_entry(model, t, p) for t, p in lp.top]}
                for lp in entries
            ]}  # fmt: skip
        tokens = [token_text(model, lp.token_id) for lp in entries]
        offsets = []
        for token in tokens:
            offsets.append(self._text_offset)
            self._text_offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in entries],
            "top_logprobs": [{token_text(model, t): p for t, p in lp.top} for lp in entries],
            "text_offset": offsets,
        }


def token_text(model: ServedModel, token_id: int) -> str:
    """One token as text (special tokens included); `token_id:N` for a model without a
    tokenizer that decodes."""
    decode = getattr(model.tokenizer, "decode", None)
    if decode is None:
        return f"token_id:{token_id}"
    return str(decode([token_id], skip_special_tokens=False))


def _token_entry(model: ServedModel, token_id: int, logprob: float) -> dict[str, Any]:
    text = token_text(model, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _logprobs(fields: dict[str, Any], kind: str) -> Any:
    """The SamplingParams `logprobs` a body asks for (None: none). Completions: `logprobs`, how
    many top tokens; chat: `logprobs: true` and `top_logprobs` (0 when absent)."""
    if kind == COMPLETION:
        return fields.get("logprobs")
    asked = _optional(fields, "logprobs", bool)
    top = fields.get("top_logprobs")
    if top is not None and not asked:
        raise InvalidRequest("top_logprobs", "needs logprobs: true")
    return (0 if top is None else top) if asked else None


def usage_of(reply: Reply) -> dict[str, Any]:
    usage = reply.output.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def models_body(model: ServedModel, created: int) -> dict[str, Any]:
    """GET /v1/models."""
    return {"object": "list", "data": [model_card(model, created)]}


def model_card(model: ServedModel, created: int) -> dict[str, Any]:
    return {"id": model.model_id, "object": "model", "created": created, "owned_by": "tandem",
            "max_model_len": model.max_model_len}  # fmt: skip


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or InvalidRequest saying why not."""
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequest("body", f"is not valid JSON: {e}"[:256]) from None
    if not isinstance(fields, dict):
        raise InvalidRequest("body", f"must be a JSON object, got {type(fields).__name__}")
    return fields


def _optional(fields: dict[str, Any], name: str, kind: type, prefix: str = "") -> Any:
    value = fields.get(name)
    if value is not None and not isinstance(value, kind):
        names = {str: "a string", bool: "a boolean", dict: "an object", int: "an integer"}
        raise InvalidRequest(prefix + name, f"must be {names[kind]}, got {value!r}"[:200])
    return value


def _refuse_unserved(fields: dict[str, Any], kind: str) -> None:
    """Refuse, naming the field, what Tandem cannot serve (rather than ignore it)."""
    n = fields.get("n")
    if n is not None and n != 1:
        raise InvalidRequest(
            "n", f"must be 1, got {n!r}: Tandem serves one choice per request; send n "
            "requests instead (they share the prompt's cached prefix)",
        )  # fmt: skip
    best_of = fields.get("best_of")
    if best_of is not None and best_of != 1:
        raise InvalidRequest("best_of", f"must be 1, got {best_of!r}: not served")
    if fields.get("echo"):
        raise InvalidRequest("echo", "is not served: the prompt is not returned")
    if fields.get("suffix"):
        raise InvalidRequest("suffix", "is not served (no insertion)")
    for name in ("tools", "functions", "response_format"):
        if kind == CHAT and fields.get(name):
            raise InvalidRequest(name, "is not served: plain text generation only")


def _completion_prompt(fields: dict[str, Any]) -> str | list[int]:
    """The one prompt of a completion body: a string, or token ids (also as a list of one)."""
    if "prompt" not in fields or fields["prompt"] is None:
        raise InvalidRequest("prompt", "is required")
    prompt = fields["prompt"]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise InvalidRequest(
                "prompt", f"one prompt per request, got {len(prompt)}; send them separately"
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if not prompt:
            raise InvalidRequest("prompt", "prompt is empty")
        return prompt  # token ids: validate_prompt_token_ids checks each
    raise InvalidRequest(
        "prompt", f"must be a string or a list of token ids, got {type(prompt).__name__}"
    )


def _chat(fields: dict[str, Any]) -> Any:
    """The `messages` of a chat body as a ChatInput (text content only)."""
    messages = fields.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages", f"must be a list of messages, got {messages!r}"[:200])
    chat = pb.ChatInput()
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}]", "must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise InvalidRequest(f"messages[{i}].role", f"must be a string, got {role!r}"[:200])
        chat.messages.add(role=role, content=_text_content(content, i))
    return chat


def _text_content(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(
                    f"messages[{i}].content", f"only text parts are served, got {kind!r}"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequest(f"messages[{i}].content", "must be a string or a list of text parts")


def _token_id_key(key: Any) -> int | Any:
    """A logit_bias key (JSON object keys are strings) as a token id; left as is if it is not
    one (SamplingParams.validate names it)."""
    try:
        return int(key)
    except (TypeError, ValueError):
        raise InvalidRequest("logit_bias", f"keys must be token ids, got {key!r}"[:200]) from None

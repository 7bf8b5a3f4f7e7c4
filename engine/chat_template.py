"""Rendering a model's Jinja chat template into prompt text.

A chat template is untrusted code shipped with a model, so it runs in Jinja's immutable sandbox,
configured the way Hugging Face transformers configures it (trim_blocks, lstrip_blocks, the
`loopcontrols` extension, a `{% generation %}` tag, `raise_exception`, `strftime_now`, a `tojson`
that does not HTML-escape) so that the same template renders the same text here.

This module only turns messages into text: it does not tokenize, does not know any model's
template, and must not import torch (the router imports it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from contracts.chat import ChatMessage
from contracts.errors import InvalidRequest

_FIELD = "messages"
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError)


class TemplateRaised(jinja2.TemplateError):
    """The template itself refused the conversation through `raise_exception(message)`."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks assistant text in some templates.

    transformers uses it to locate assistant tokens for training; for rendering the body is
    output unchanged, which is all this does.
    """

    tags = {"generation"}  # noqa: RUF012 (jinja declares it as an instance attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> str:
    raise TemplateRaised(message)


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _new_environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationTag],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to.

    Compilation is lazy: a model whose template does not parse still loads (plain completions
    work); rendering it raises `InvalidRequest("messages", ...)`.
    """

    def __init__(self, source: str, bos_token: str | None, eos_token: str | None) -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._compiled: jinja2.Template | None = None

    def render(
        self,
        messages: Sequence[Mapping[str, Any] | ChatMessage],
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text for `messages`; with `add_generation_prompt` it ends where the
        assistant's reply begins."""
        plain_messages = normalize_messages(messages)
        template = self._template()
        try:
            return template.render(
                messages=plain_messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                tools=None,
                documents=None,
            )
        except _RENDER_ERRORS as exc:
            raise InvalidRequest(_FIELD, f"chat template failed: {exc}") from exc

    def _template(self) -> jinja2.Template:
        if self._compiled is None:
            try:
                self._compiled = _new_environment().from_string(self.source)
            except jinja2.TemplateError as exc:
                raise InvalidRequest(_FIELD, f"chat template does not compile: {exc}") from exc
        return self._compiled


def render_chat_template(
    source: str | None,
    messages: Sequence[Mapping[str, Any] | ChatMessage],
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> str:
    """One-shot rendering; `source` None means the model has no template."""
    if source is None:
        raise InvalidRequest(_FIELD, "model has no chat template")
    return ChatTemplate(source, bos_token, eos_token).render(messages, add_generation_prompt)


def normalize_messages(
    messages: Sequence[Mapping[str, Any] | ChatMessage],
) -> list[dict[str, Any]]:
    """Validated plain-dict copies of `messages` (what templates index into).

    Each message needs a str `role` and a str `content`; other keys of a mapping are kept.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidRequest(_FIELD, "must be a list of messages")
    if not messages:
        raise InvalidRequest(_FIELD, "must not be empty")
    return [_normalize_message(index, message) for index, message in enumerate(messages)]


def _normalize_message(index: int, message: Mapping[str, Any] | ChatMessage) -> dict[str, Any]:
    if isinstance(message, ChatMessage):
        plain = {"role": message.role, "content": message.content}
    elif isinstance(message, Mapping):
        plain = dict(message)
    else:
        raise InvalidRequest(_FIELD, f"message {index} is not an object with role and content")
    for key in ("role", "content"):
        if not isinstance(plain.get(key), str):
            raise InvalidRequest(_FIELD, f"message {index} needs a string {key!r}")
    return plain

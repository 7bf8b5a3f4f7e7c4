"""Text <-> token ids for a served model, from GGUF metadata or a Hugging Face folder: a
`tokenizers.Tokenizer` plus the BOS rule, the ids that end a generation (declared EOS, end-of-turn
ids, the chat template's end marker: no names hard-coded), special tokens and the chat template.
A GGUF tokenizer it cannot rebuild faithfully is refused (UnsupportedModel), never approximated.
Must not import torch (the router imports it); `gguf` only inside `read_gguf_metadata`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from contracts.chat import ChatMessage
from contracts.errors import InvalidRequest, ModelLoadError, UnsupportedModel
from engine.chat_template import ChatTemplate

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TURN_END_SENTINEL = "tandem-turn-end-sentinel"


@dataclass(frozen=True)
class _ByteLevelPreset:
    """How one GGUF `tokenizer.ggml.pre` value splits text before byte-level BPE.

    `split_regex` None means the GPT-2 regex built into `ByteLevel`. The NFC, ignore-merges and
    add-BOS defaults follow the original Hugging Face `tokenizer.json` of that model family.
    """

    split_regex: str | None = None
    individual_digits: bool = False
    nfc: bool = False
    ignore_merges: bool = False
    add_bos_default: bool = False


_BYTE_LEVEL_PRESETS: dict[str, _ByteLevelPreset] = {
    "default": _ByteLevelPreset(),
    "gpt-2": _ByteLevelPreset(),
    "smollm": _ByteLevelPreset(individual_digits=True),
    "llama-bpe": _ByteLevelPreset(
        split_regex=_LLAMA3_SPLIT, ignore_merges=True, add_bos_default=True
    ),
    "qwen2": _ByteLevelPreset(split_regex=_QWEN2_SPLIT, nfc=True),
}


class Tokenizer:
    """A model's tokenizer plus the serving facts around it (BOS rule, EOS ids, chat template).

    Build it with `from_gguf_metadata`, `from_gguf_file` or `from_hf_dir`.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        extra_eos_token_ids: Iterable[int] = (),
        add_bos_token: bool,
        chat_template: str | None,
    ) -> None:
        if add_bos_token and bos_token_id is None:
            raise ModelLoadError("tokenizer asks for a BOS token but declares no BOS token id")
        self._backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1
        # The most characters one token spells (byte-level: its bytes, at least its chars).
        self.max_token_chars: int = max(len(token) for token in vocab)
        self._special_ids = frozenset(
            token_id
            for token_id, added in backend.get_added_tokens_decoder().items()
            if added.special
        )
        self.bos_token_id = _checked_id(bos_token_id, self.vocab_size, "BOS")
        self.add_bos_token = add_bos_token
        eos_token_id = _checked_id(eos_token_id, self.vocab_size, "EOS")
        self._chat_template: ChatTemplate | None = None
        if chat_template is not None:
            self._chat_template = ChatTemplate(
                chat_template, self._token_text(self.bos_token_id), self._token_text(eos_token_id)
            )
        declared = [eos_token_id, *extra_eos_token_ids, self._turn_end_token_id()]
        self.eos_token_ids: frozenset[int] = frozenset(
            checked
            for token_id in declared
            if (checked := _checked_id(token_id, self.vocab_size, "EOS")) is not None
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Rebuild the tokenizer described by GGUF metadata (see `read_gguf_metadata`)."""
        model_type = meta.get("tokenizer.ggml.model")
        if model_type != "gpt2":
            raise UnsupportedModel(
                f"GGUF tokenizer model {model_type!r} is not supported (supported: 'gpt2')"
            )
        pre_type = meta.get("tokenizer.ggml.pre", "default")
        preset = _BYTE_LEVEL_PRESETS.get(pre_type)
        if preset is None:
            raise UnsupportedModel(
                f"GGUF pre-tokenizer {pre_type!r} is not supported "
                f"(supported: {', '.join(sorted(_BYTE_LEVEL_PRESETS))})"
            )
        backend = _byte_level_backend(meta, preset)
        extra_eos = [
            meta[key]
            for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if key in meta
        ]
        return cls(
            backend,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            extra_eos_token_ids=extra_eos,
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", preset.add_bos_default)),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_gguf_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """`from_gguf_metadata(read_gguf_metadata(path))`."""
        return cls.from_gguf_metadata(read_gguf_metadata(path))

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` (the last
        two optional) from a Hugging Face model folder."""
        directory = Path(path)
        backend = _load_tokenizer_json(directory / "tokenizer.json")
        config = _read_json_object(directory / "tokenizer_config.json")
        generation = _read_json_object(directory / "generation_config.json")
        generation_eos = _id_list(generation.get("eos_token_id"))
        bos_token_id = _added_token_id(backend, config.get("bos_token"))
        if bos_token_id is None and isinstance(generation.get("bos_token_id"), int):
            bos_token_id = generation["bos_token_id"]
        eos_token_id = _added_token_id(backend, config.get("eos_token"))
        if eos_token_id is None and generation_eos:
            eos_token_id = generation_eos[0]
        add_bos_token = config.get("add_bos_token")
        if not isinstance(add_bos_token, bool):
            add_bos_token = _post_processor_prepends(backend, bos_token_id)
        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            extra_eos_token_ids=generation_eos,
            add_bos_token=add_bos_token,
            chat_template=_hf_chat_template(directory, config),
        )

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their single ids.

        BOS is prepended iff the model adds one (`add_bos_token`) and `add_special_tokens`.
        """
        token_ids: list[int] = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            return [self.bos_token_id, *token_ids]
        return token_ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `token_ids`; ids outside the vocabulary are dropped."""
        return self._backend.decode(
            [int(token_id) for token_id in token_ids], skip_special_tokens=skip_special_tokens
        )

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (in the tokenizer's own spelling) for `token_id`, or None."""
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry spelled as in the vocabulary, or None."""
        return self._backend.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special (control) token, dropped by `skip_special_tokens`."""
        return token_id in self._special_ids

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any] | ChatMessage],
        add_generation_prompt: bool = True,
    ) -> str:
        """Prompt text for a conversation; raises `InvalidRequest("messages", ...)`."""
        if self._chat_template is None:
            raise InvalidRequest("messages", "model has no chat template")
        return self._chat_template.render(messages, add_generation_prompt)

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._backend.id_to_token(token_id)

    def _turn_end_token_id(self) -> int | None:
        """The special token the chat template writes right after an assistant message."""
        if self._chat_template is None:
            return None
        conversation = [
            ChatMessage("user", "Hello"),
            ChatMessage("assistant", _TURN_END_SENTINEL),
        ]
        try:
            text = self._chat_template.render(conversation, add_generation_prompt=False)
        except InvalidRequest:
            return None
        position = text.rfind(_TURN_END_SENTINEL)
        if position < 0:
            return None
        tail = text[position + len(_TURN_END_SENTINEL) :].lstrip()
        tail_ids = self.encode(tail, add_special_tokens=False)
        if tail_ids and self.is_special(tail_ids[0]):
            return tail_ids[0]
        return None


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every key/value of a GGUF file's header as plain Python values (tensor data not read).

    Raises ModelLoadError if the file is missing or not a readable GGUF.
    """
    from gguf import GGUFReader

    if not Path(path).is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
        return {name: field.contents() for name, field in reader.fields.items()}
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise ModelLoadError(f"cannot read GGUF metadata from {path}: {exc}") from exc


def _byte_level_backend(meta: Mapping[str, Any], preset: _ByteLevelPreset) -> tokenizers.Tokenizer:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError("GGUF metadata has no tokenizer.ggml.tokens")
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    bpe = models.BPE(
        vocab=vocab,
        merges=_parse_merges(meta.get("tokenizer.ggml.merges")),
        ignore_merges=preset.ignore_merges,
    )
    backend = tokenizers.Tokenizer(bpe)
    if preset.nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _byte_level_pre_tokenizer(preset)
    backend.decoder = decoders.ByteLevel()
    _add_typed_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type") or ())
    return backend


def _parse_merges(merges: Sequence[str] | None) -> list[tuple[str, str]]:
    if not merges:
        raise ModelLoadError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ModelLoadError(f"malformed GGUF merge {merge!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def _byte_level_pre_tokenizer(preset: _ByteLevelPreset) -> pre_tokenizers.PreTokenizer:
    steps: list[pre_tokenizers.PreTokenizer] = []
    if preset.individual_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if preset.split_regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(preset.split_regex), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _add_typed_tokens(
    backend: tokenizers.Tokenizer, tokens: Sequence[str], token_types: Sequence[int]
) -> None:
    """Register control tokens as special and user-defined ones as plain added tokens, so that
    they are matched whole in text instead of being split by BPE."""
    if token_types and len(token_types) != len(tokens):
        raise ModelLoadError(f"GGUF has {len(tokens)} tokens but {len(token_types)} token types")
    control = [
        AddedToken(token, special=True, normalized=False)
        for token, token_type in zip(tokens, token_types, strict=False)
        if token_type == TOKEN_TYPE_CONTROL
    ]
    user_defined = [
        AddedToken(token, special=False, normalized=False)
        for token, token_type in zip(tokens, token_types, strict=False)
        if token_type == TOKEN_TYPE_USER_DEFINED
    ]
    if control:
        backend.add_special_tokens(control)
    if user_defined:
        backend.add_tokens(user_defined)


def _checked_id(token_id: Any, vocab_size: int, what: str) -> int | None:
    if token_id is None:
        return None
    if isinstance(token_id, bool) or not isinstance(token_id, int):
        raise ModelLoadError(f"{what} token id {token_id!r} is not an integer")
    if not 0 <= token_id < vocab_size:
        raise ModelLoadError(f"{what} token id {token_id} is outside the vocabulary")
    return token_id


def _load_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise ModelLoadError(f"tokenizer file not found: {path}")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust parser raises bare Exception
        raise ModelLoadError(f"cannot parse {path}: {exc}") from exc
    backend.no_truncation()
    backend.no_padding()
    return backend


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return loaded


def _id_list(value: Any) -> list[int]:
    """`eos_token_id` of generation_config.json: an int, a list of ints, or absent."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, int) and not isinstance(item, bool)]
    return []


def _added_token_id(backend: tokenizers.Tokenizer, token: Any) -> int | None:
    """Id of a tokenizer_config token entry: a string or an AddedToken dict with `content`."""
    if isinstance(token, Mapping):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    return backend.token_to_id(token)


def _post_processor_prepends(backend: tokenizers.Tokenizer, bos_token_id: int | None) -> bool:
    """Whether tokenizer.json's own post-processor puts BOS first (used when the config is mute)."""
    if bos_token_id is None:
        return False
    token_ids = backend.encode("", add_special_tokens=True).ids
    return bool(token_ids) and token_ids[0] == bos_token_id


def _hf_chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    """`chat_template` of tokenizer_config.json (a string, or a list of named templates whose
    `default` is used), else the `chat_template.jinja` file newer repositories ship."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {
            entry.get("name"): entry.get("template")
            for entry in template
            if isinstance(entry, Mapping)
        }
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    return None

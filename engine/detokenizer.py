"""Turning a stream of generated token ids into a stream of text deltas. Text is emitted only once
the decoded window no longer ends in U+FFFD (a token can end inside a UTF-8 character); each step
decodes a short window, never the whole output. For byte-level BPE the deltas (after `flush`)
concatenate to `tokenizer.decode(output_ids)`. Must not import torch (the router imports it);
it knows nothing of stop strings or EOS. The leading-space rule: docs/engine.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.tokenizer import Tokenizer

_NUM_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Per-request state for incremental decoding of one output sequence.

    The window `_window_ids[_prefix_offset:]` holds context tokens whose text was already emitted
    (`[_prefix_offset:_read_offset]`) followed by tokens whose text is still pending.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window_ids: list[int] = [int(i) for i in prompt_token_ids[-_NUM_CONTEXT_TOKENS:]]
        self._prefix_offset = 0
        self._read_offset = len(self._window_ids)
        self._chunks: list[str] = []
        self._num_output_tokens = 0

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def num_output_tokens(self) -> int:
        return self._num_output_tokens

    def add(self, new_token_ids: Sequence[int]) -> str:
        """Append generated ids; return the text they complete ("" while a character is partial)."""
        if not new_token_ids:
            return ""
        self._window_ids.extend(int(i) for i in new_token_ids)
        self._num_output_tokens += len(new_token_ids)
        return self._advance(allow_partial=False)

    def flush(self) -> str:
        """At the end of the sequence: return whatever is still held back, even if partial."""
        return self._advance(allow_partial=True)

    def _advance(self, allow_partial: bool) -> str:
        if self._read_offset == len(self._window_ids):
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset, len(self._window_ids))
        if not allow_partial and (
            len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR)
        ):
            return ""
        delta = full_text[len(prefix_text) :]
        self._slide_window()
        if delta:
            self._chunks.append(delta)
        return delta

    def _slide_window(self) -> None:
        """The pending tokens become the context of the next step; older ones are dropped."""
        del self._window_ids[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._window_ids)

    def _decode(self, start: int, stop: int) -> str:
        return self._tokenizer.decode(
            self._window_ids[start:stop], skip_special_tokens=self._skip_special_tokens
        )

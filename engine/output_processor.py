"""From sampled tokens to what a caller sees: text deltas, stop decisions, finish reasons.

Decides when a sequence is done (EOS, stop token ids, stop strings, max_tokens, end of the
context) and produces one RequestOutput per sequence per step. Text is held back while it
could still turn out to be the start of a stop string, so no caller ever sees a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contracts.outputs import FinishReason, RequestOutput, TokenLogprobs
from engine.detokenizer import IncrementalDetokenizer
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer


@dataclass(slots=True)
class _TextState:
    detokenizer: IncrementalDetokenizer
    text: str = ""  # all output text so far (stop strings excluded)
    num_emitted_chars: int = 0
    stop: tuple[str, ...] = field(default=())


class OutputProcessor:
    """Tracks each request's text; one instance per engine, called from its step loop."""

    def __init__(
        self, tokenizer: Tokenizer | None, eos_token_ids: frozenset[int], max_model_len: int
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self._text: dict[str, _TextState] = {}

    def add(self, seq: Sequence) -> None:
        if self.tokenizer is None:
            return
        detokenizer = IncrementalDetokenizer(
            self.tokenizer, seq.prompt_token_ids, seq.sampling_params.skip_special_tokens
        )
        self._text[seq.request_id] = _TextState(detokenizer, stop=seq.sampling_params.stop)
        for token_id in seq.output_token_ids:  # resumed: sent already, by the worker it left
            self._text_delta(seq, [token_id], is_last=False)

    def process_token(self, seq: Sequence, logprobs: TokenLogprobs | None) -> RequestOutput:
        """Account for the token just appended to `seq`; sets `seq.finish_reason` if done
        (the caller frees the sequence)."""
        return self.token_output(seq, logprobs, self._token_finish_reason(seq, seq.token_ids[-1]))

    def needs_text_to_finish(self, seq: Sequence) -> bool:
        """Whether only the text can tell if `seq` finished (it has stop strings)."""
        return seq.request_id in self._text and bool(seq.sampling_params.stop)

    def finish_by_token(self, seq: Sequence) -> FinishReason | None:
        """The finish the token just appended to `seq` decides without its text (EOS, stop
        ids, max_tokens, the context end), set as `seq.finish_reason`; for a sequence whose
        needs_text_to_finish is False that is its whole finish decision. Its output comes from
        token_output(seq, logprobs, reason) later, before anything else is appended."""
        reason = self._token_finish_reason(seq, seq.token_ids[-1])
        seq.finish_reason = seq.finish_reason or reason
        return reason

    def token_output(
        self, seq: Sequence, logprobs: TokenLogprobs | None, reason: FinishReason | None
    ) -> RequestOutput:
        """The output of the token just appended to `seq`, whose token finish is `reason`
        (finish_by_token's): its text delta, and a stop string's finish if one appears."""
        token_id = seq.token_ids[-1]
        is_stop_token = reason is FinishReason.STOP
        delta = self._text_delta(seq, [] if is_stop_token else [token_id], reason is not None)
        reason = seq.finish_reason or reason
        seq.finish_reason = reason
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=(token_id,),
            text_delta=delta,
            finished=reason is not None,
            finish_reason=reason,
            usage=seq.usage(),
            logprobs=() if logprobs is None else (logprobs,),
        )

    def forget(self, seq: Sequence) -> None:
        """Drop a request's text state without a closing output (it continues elsewhere)."""
        self._text.pop(seq.request_id, None)

    def finish(self, seq: Sequence, reason: FinishReason) -> RequestOutput:
        """The closing output of a request ended from outside (abort)."""
        self._text.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, (), "", True, reason, seq.usage())

    def _token_finish_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params = seq.sampling_params
        if token_id in params.stop_token_ids:
            return FinishReason.STOP
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _text_delta(self, seq: Sequence, token_ids: list[int], is_last: bool) -> str:
        state = self._text.get(seq.request_id)
        if state is None:
            return ""
        state.text += state.detokenizer.add(token_ids)
        if is_last:
            state.text += state.detokenizer.flush()
        stop_at = _find_stop(state.text, state.stop, state.num_emitted_chars)
        if stop_at is not None:
            state.text = state.text[:stop_at]
            seq.finish_reason = FinishReason.STOP
            is_last = True
        hold = 0 if is_last else _longest_stop_prefix_suffix(state.text, state.stop)
        end = max(len(state.text) - hold, state.num_emitted_chars)
        delta = state.text[state.num_emitted_chars : end]
        state.num_emitted_chars = end
        if is_last:
            del self._text[seq.request_id]
        return delta


def _find_stop(text: str, stops: tuple[str, ...], num_emitted_chars: int) -> int | None:
    """Index of the earliest stop string not yet emitted past, or None."""
    found: int | None = None
    for stop in stops:
        index = text.find(stop, max(0, num_emitted_chars - len(stop) + 1))
        if index != -1 and (found is None or index < found):
            found = index
    return found


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins some stop string (held back)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest

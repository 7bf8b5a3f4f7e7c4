"""The prefill -> decode handoff: what a prefill worker returns and the router passes on.

    router --prefill(ship_to)--> prefill worker: prompt computed, first token sampled,
                                 KV held for transfer (no text, no finish reason)
    router <-- PrefillResult --  (first token, its logprobs, prefill's usage, KVHandle or None)
    router --start_continue(PrefillResult)--> decode worker: owns the text from the first
                                 token on; joins the KV named by the handle's transfer id

The transfer id is minted once, by the prefill worker; nobody re-derives it. Plain frozen data,
picklable across Ray; torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from contracts.outputs import TokenLogprobs, Usage


@dataclass(frozen=True, slots=True)
class KVHandle:
    """A prompt's KV on its way from a prefill worker to a decode worker."""

    transfer_id: str  # minted by the prefill worker for this transfer, unique
    prefill_worker: str  # the sending worker's id
    decode_worker: str  # the receiving worker's id
    num_tokens: int  # tokens of KV shipped: the prompt from `start_token` on
    # The first prompt token shipped (a block boundary): the decode worker holds the KV of the
    # tokens before it in its own prefix cache (decode-side prefix reuse); 0: the whole prompt.
    start_token: int = 0
    num_blocks: int = 0  # KV blocks shipped (the last may be partly filled); 0: not told

    def __post_init__(self) -> None:
        if not isinstance(self.transfer_id, str) or not self.transfer_id:
            raise ValueError(f"transfer_id={self.transfer_id!r} must be a non-empty str")
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens={self.num_tokens} must be >= 1")
        if self.start_token < 0 or self.num_blocks < 0:
            raise ValueError(
                f"start_token={self.start_token} and num_blocks={self.num_blocks} must be >= 0"
            )


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """A finished prefill: the first token, sampled but not yet turned into text (the decode
    worker does that, with the rest), and where the prompt's KV went.

    kv None: no KV was shipped (the router said the first token ends the request, e.g.
    max_tokens=1); the decode worker then only turns the first token into the closing output.
    """

    first_token_id: int
    logprobs: TokenLogprobs | None  # of the first token, if the request asked for logprobs
    usage: Usage  # the prefill's: prompt tokens, its prefix-cache hits, its queue time
    kv: KVHandle | None


@dataclass(frozen=True, slots=True)
class MovedKV:
    """A running request's KV moved off a draining decode worker (issue 22.3), as the router
    continues it: on decode worker `result.kv.decode_worker`, under the same attempt id
    `request_id` (its KV was shipped under it), by `start_continue(result)` with all but the
    last of the `num_output_tokens` tokens it produced as resumed tokens. `result.kv` names
    the transfer (the draining worker as its sender); `result.first_token_id` is the last
    token produced, sent to the client already: the new worker's first output repeats it."""

    request_id: str
    num_output_tokens: int
    result: PrefillResult

    def __post_init__(self) -> None:
        if self.num_output_tokens < 1 or self.result.kv is None:
            raise ValueError(
                f"num_output_tokens={self.num_output_tokens} must be >= 1 and the result's kv "
                f"set (got {self.result.kv!r})"
            )

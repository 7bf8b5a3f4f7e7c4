"""One request's scheduling state inside an engine: its tokens, KV blocks and status.

The scheduler and block manager read and write it; the model runner reads it. It holds no
tensors and knows nothing of text: detokenization lives in the output processor.
"""

from __future__ import annotations

import enum
import time

from contracts.block_hash import BlockHash, hash_blocks
from contracts.outputs import FinishReason, Usage
from contracts.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    AWAITING_KV = "awaiting_kv"  # prefilled elsewhere, first token known, prompt KV not here yet
    FINISHED = "finished"


class Sequence:
    """A request being generated. Tokens are prompt then output; KV lives in `block_ids`.

    `num_computed_tokens` counts the leading tokens whose KV is in the cache. Each step computes
    tokens [num_computed_tokens, num_tokens); when that reaches the end, a new token is sampled.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        root_hash: BlockHash,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # set the first time the sequence is scheduled
        self.arrival_time = time.monotonic()
        self.queue_seconds = 0.0  # arrival to the first schedule, set then
        self.num_preemptions = 0
        self.block_ids: list[int] = []
        # leading blocks of block_ids known to be in the prefix cache (hashed while this
        # sequence holds them, so they stay): BlockManager.cache_computed_blocks skips them
        self.num_registered_blocks = 0
        self._root_hash = root_hash
        self.block_hashes: list[BlockHash] = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def full_block_hashes(self, block_size: int) -> list[BlockHash]:
        """Hashes of every full block of the current tokens, extended lazily."""
        parent = self.block_hashes[-1] if self.block_hashes else self._root_hash
        self.block_hashes += hash_blocks(self.token_ids, block_size, parent, len(self.block_hashes))
        return self.block_hashes

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.num_prompt_tokens,
            cached_tokens=max(self.num_cached_tokens, 0),
            completion_tokens=self.num_output_tokens,
            queue_seconds=self.queue_seconds,
        )

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, status={self.status.value}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"blocks={self.block_ids})"
        )

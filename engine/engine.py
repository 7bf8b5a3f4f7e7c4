"""The engine: one model in one process, serving many requests with continuous batching.

    add_request() -> step() -> step() -> ... -> outputs, until every request has finished

Each step is three calls: the scheduler picks sequences and token counts, the model runner
computes their logits, the sampler and output processor turn logits into tokens, text and
finish decisions. Not thread-safe: one thread drives an engine. Knows nothing of Ray, gRPC,
Redis or asyncio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from typing import Any

import torch

from contracts.block_hash import root_hash
from contracts.chat import ChatMessage
from contracts.errors import InvalidRequest, KVTransferError, RankFailed
from contracts.outputs import FinishReason, RequestOutput, TokenLogprobs, Usage
from contracts.sampling_params import SamplingParams, check_token_id, validate_prompt_token_ids
from engine import build
from engine.attention import select_backend
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.kv_calibration import (
    calibrate_kv_amax,
    calibration_ids,
    checkpoint_table,
    load_kv_scales,
    whole_model_table,
)
from engine.kv_quant import KV_FP8_DTYPE, calibrated_scales, scales_digest
from engine.loader import describe_model, resolve_model
from engine.model_runner import ModelRunner
from engine.output_processor import OutputProcessor
from engine.parallel import TensorParallelGroup, encode_plan, start_ranks
from engine.sampler import LogitBias, Sampler, SamplerOutput, SampleRow, plain_greedy
from engine.scheduler import ScheduledSequence, Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus
from engine.sharding import ShardLayout, check_divisible, shard_layout
from engine.transfer_region import TransferRegion

logger = logging.getLogger(__name__)

# An idle step with kept KV waiting for staging blocks waits at most this long for some to free
# (a transfer's Ack, on another thread), instead of spinning.
STAGING_WAIT_S = 0.01
# CUDA: a step whose samplers are all plain greedy queues its argmax and the ids' copy to
# pinned host memory behind the step at launch, so its collection waits once and reads host
# memory (no argmax launch and blocking copy between the step's end and the next launch).
# False: the argmax is taken at collection (the earlier behaviour, for A/B benchmarks).
GREEDY_AT_LAUNCH = True
# With overlap_outputs: a decode step whose rows are every running sequence, all plain greedy,
# is followed by the next decode step launched before it is collected (less the sequences it
# ends by their length): that step's tokens are the argmax rows of the one in flight, copied
# on the device, and its positions one further. The device then never waits for the host
# between two decode steps (its work: the collection, the outputs, the next schedule and
# inputs). A sequence the step in flight finishes otherwise (EOS, stop ids or strings) still
# has a row in the step after it, dropped at its collection (its blocks held until then) and
# from the step that follows that one. False: each step is launched after the last is
# collected.
FOLLOW_DECODES = True


class KVPending(enum.Enum):
    """take_kept_kv's "not yet": the KV is pinned but waits for staging blocks."""

    STAGING = "waiting for staging blocks"


@dataclass(frozen=True, slots=True)
class Completion:
    """The whole result of one request, as `generate` returns it."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    usage: Usage


@dataclass(frozen=True, slots=True)
class KeptKV:
    """KV of a finished request, pinned for a transfer: `num_tokens` tokens (the prompt, for
    a prefill-only request) in `block_ids`, held by `owner` in the engine's block manager.
    Under private-KV tensor parallelism every head of them is also in rank 0's staging
    region, at `staging_ids` (held by the same owner, freed with it)."""

    owner: str
    block_ids: tuple[int, ...]
    num_tokens: int
    staging_ids: tuple[int, ...] = ()

    @property
    def transfer_block_ids(self) -> tuple[int, ...]:
        """The ids a transfer reads in Engine.transfer_kv_cache: the staging ids, if staged,
        else the blocks themselves."""
        return self.staging_ids or self.block_ids


@dataclass(frozen=True, slots=True)
class Prefilled:
    """How a `prefill_only` request ends: its prompt computed, its first token sampled but not
    turned into text and no finish decided (the decode side does both), its prompt's KV pinned
    for a transfer (`kv`: the caller ships it, then `block_manager.release(kv.owner)`)."""

    request_id: str
    first_token_id: int
    logprobs: TokenLogprobs | None  # of the first token, if asked for
    usage: Usage  # the prefill's: prompt tokens, prefix-cache hits, queue time
    kv: KeptKV


class Engine:
    """tp_group: set only on ranks 1..N-1 of a tensor-parallel engine (engine.parallel starts
    them); rank 0 is the Engine a caller makes with tensor_parallel_size=N, and starts them."""

    def __init__(
        self, config: EngineConfig | None = None, *, tp_group: TensorParallelGroup | None = None
    ) -> None:
        self.config = config = config or EngineConfig()
        started = time.perf_counter()
        self.device = build.pick_device(config.device)
        self.dtype = build.pick_dtype(config.dtype, self.device)
        self.kv_dtype = KV_FP8_DTYPE if config.kv_cache_dtype == "fp8" else self.dtype
        self.backend = select_backend(self.device)
        self.info, handle = describe_model(resolve_model(config.model), config.converted_cache)
        self.model_config = self.info.config
        self.tokenizer = self.info.tokenizer
        # a per-head FP8 scale table to load, read before any rank starts (a bad file fails here)
        scales_path = config.kv_cache_scales_path
        self._loaded_kv_scales = (
            None if scales_path is None else load_kv_scales(scales_path, self.model_config)
        )
        self.tp = tp_group or self._start_tensor_parallel()
        self.model = build.build_model(
            config, self.info, handle, self.backend, self.device, self.dtype, self.shard, self.tp
        )
        if self.device.type == "cuda" and config.triton_gemv:
            self.model.use_triton_gemv()
        fused_quant = config.fused_fp8_quant
        if fused_quant is None:
            fused_quant = self.model.fused_fp8_quant_applies()
        if self.device.type == "cuda" and fused_quant:
            self.model.use_fused_fp8_quant()
        scheduler_config = build.scheduler_config(config, self.device)
        # rank 0's transfer staging region (private-KV TP that transfers KV), taken from its budget
        self.transfer_region: TransferRegion | None = None
        if self._transfer_cache_is_own:
            self.transfer_region = TransferRegion(self._staging_blocks(scheduler_config))
        self.num_kv_blocks = self._num_kv_blocks()
        self.max_model_len = build.max_model_len(config, self.model_config, self.num_kv_blocks)
        self._check_staging_holds_a_sequence()
        self.block_manager = BlockManager(
            self.num_kv_blocks,
            config.block_size,
            config.enable_prefix_caching,
            self.transfer_region,
        )
        self.scheduler = Scheduler(scheduler_config, self.block_manager)
        self.runner = ModelRunner(
            self.model,
            self.backend,
            self.num_kv_blocks,
            config.block_size,
            self.device,
            self.kv_dtype,
            self.tp.shared_kv_cache if self.tp is not None and self._shares_kv_cache else None,
            config.kv_cache_scales,
        )
        if self.transfer_region is not None:
            assert self.tp is not None
            self.tp.allocate_whole_kv_cache(
                self.runner.kv_cache,
                self.model_config.num_kv_heads,
                self.transfer_region.num_blocks,
            )
        # names the per-head FP8 KV scales of every KV head (kvtransfer's layout check); set
        # after every rank is ready (TP: calibration's collectives come after the start-up
        # barrier) and the cache is allocated, before graphs capture the scales
        self.kv_scales_digest: str | None = None
        # and the table itself, every KV head's [layers, 2, num_kv_heads] on the CPU
        # (kv_calibration.save_kv_scales writes it for other engines to load)
        self.kv_scales_table: torch.Tensor | None = None
        if config.kv_cache_dtype == "fp8" and config.kv_cache_scales == "per_head":
            self._calibrate_kv_scales()
        elif self.model.checkpoint_kv_scales is not None:
            logger.info("ignoring the checkpoint's KV-cache scales: the KV cache is %s%s",
                        config.kv_cache_dtype, " with per-token scales"
                        if config.kv_cache_dtype == "fp8" else "")  # fmt: skip
        if self.device.type == "cuda" and config.cuda_graphs:
            self.runner.capture_cuda_graphs(self.scheduler.config.max_num_seqs, self.max_model_len)
        self.sampler = Sampler(config.seed, self.device)
        eos_ids = self.tokenizer.eos_token_ids if self.tokenizer else frozenset()
        self.outputs = OutputProcessor(self.tokenizer, eos_ids, self.max_model_len)
        self._sequences: dict[str, Sequence] = {}
        self._logit_biases: dict[str, LogitBias] = {}  # made once per request, not per step
        self._keep_kv: set[str] = set()  # requests whose KV is pinned when they finish
        self._kept_kv: dict[str, KeptKV] = {}
        self._prefill_only: set[str] = set()  # requests that end once their prompt is done
        self._prefilled: list[Prefilled] = []  # ended so, until take_prefilled
        # kept KV (pinned) waiting, oldest first, for staging blocks before it can ship
        self._unstaged: deque[_Unstaged] = deque()
        # requests awaiting KV for their prompt after a prefix this engine holds: the owner of
        # that prefix's blocks (hold_prefix), until attach_kv or the request ends
        self._prefix_holds: dict[str, str] = {}
        self.num_prompt_tokens_computed = 0  # prompt tokens run through the model, ever
        self.num_kv_staging_waits = 0  # kept KV that had to wait for staging blocks, ever
        # the step launched ahead (config.overlap_outputs), collected by the next step()
        self._in_flight: _Launched | None = None
        self.num_steps_launched_ahead = 0  # ever; each is collected (none is discarded)
        # what launching a step ahead raised: the next step() raises it (its outputs came first)
        self._launch_error: Exception | None = None
        self.num_steps_followed = 0  # launched before the step before them was collected
        # (start, end) of a step launched on CUDA: its device time, and the wait for it; two
        # pairs in turn (a step that follows another is launched before that one is collected)
        self._launch_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._events_turn = 0
        # pinned host buffers the greedy ids of a launch are copied into, used in turn
        self._greedy_host: tuple[torch.Tensor, ...] | None = None
        self._greedy_turn = 0
        if self.device.type == "cuda":
            self._launch_events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(2)
            ]
        self._generate_ids = itertools.count()
        self._kept_numbers = itertools.count()  # kept-KV owners are unique per keep
        logger.info(
            "engine ready: model=%s device=%s dtype=%s kv=%s quantization=%s kv_blocks=%d "
            "max_model_len=%d in %.1fs",
            self.model_id,
            self.device,
            self.dtype,
            self.kv_dtype,
            self.config.quantization,
            self.num_kv_blocks,
            self.max_model_len,
            time.perf_counter() - started,
        )

    @property
    def model_id(self) -> str:
        return self.info.source.model_id

    def _own_heads(self, table: torch.Tensor) -> torch.Tensor:
        """This rank's KV heads of a whole-model [layers, 2, num_kv_heads] table."""
        shard = self.shard
        if shard is None:
            return table
        return table[:, :, shard.kv_head_start : shard.kv_head_start + shard.num_kv_heads]

    def _calibrate_kv_scales(self) -> None:
        """Give the model its per-head FP8 KV scales: the table at kv_cache_scales_path, else
        the checkpoint's KV-cache scales, else calibrated (engine.kv_calibration): one forward
        pass over the calibration text, on every rank at once under tensor parallelism."""
        started = time.perf_counter()
        if self._loaded_kv_scales is not None:
            whole, source = self._loaded_kv_scales, str(self.config.kv_cache_scales_path)
        elif self.model.checkpoint_kv_scales is not None:  # the same tensors on every rank
            whole = checkpoint_table(self.model.checkpoint_kv_scales, self.model_config)
            source = "the checkpoint"
        else:
            ids = calibration_ids(
                self.tokenizer,
                self.model_config.vocab_size,
                self.model_config.max_position_embeddings,
            )
            amax = calibrate_kv_amax(self.model, ids, self.device)
            # the whole model's table on every rank, then each rank's heads: a non-finite amax
            # anywhere fails every rank alike (none is left waiting in a collective)
            try:
                whole = calibrated_scales(whole_model_table(amax, self.model_config, self.tp))
            except ValueError:  # every rank refuses the same table
                self._stop_ranks_at_start()
                raise
            source = f"calibration on {len(ids)} tokens"
        self.model.set_kv_scales(self._own_heads(whole).to(self.device))
        self.kv_scales_digest = scales_digest(whole)
        self.kv_scales_table = whole
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # calibration's activations, back to the device
        logger.info(
            "per-head FP8 KV scales from %s in %.2fs: 2^[%d, %d], digest %s",
            source,
            time.perf_counter() - started,
            int(whole.log2().min()),
            int(whole.log2().max()),
            self.kv_scales_digest,
        )

    def _start_tensor_parallel(self) -> TensorParallelGroup | None:
        """At tensor_parallel_size N > 1: refuse a model that does not split N ways, then start
        ranks 1..N-1. None at N = 1 (no process group at all)."""
        size = self.config.tensor_parallel_size
        if size == 1:
            return None
        check_divisible(self.model_config, size)
        return start_ranks(self.config, self.device)

    @property
    def _shares_kv_cache(self) -> bool:
        """Whether the ranks' caches are views of one CPU cache (so KV transfer reaches every
        rank's heads): CPU ranks whose KV heads are split, not replicated, unless the config
        turns sharing off (tensor_parallel_shared_kv) or the cache is FP8 (a packed FP8 block
        holds all its heads' values, then their scales: no head range is a view of it)."""
        shard = self.shard
        return (
            self.device.type == "cpu"
            and self.config.tensor_parallel_shared_kv
            and self.config.kv_cache_dtype != "fp8"
            and shard is not None
            and shard.tp_size > 1
            and (self.model_config.num_kv_heads >= shard.tp_size)
        )

    @property
    def _private_kv(self) -> bool:
        """Whether this is rank 0 of ranks that each hold their own KV heads (GPU ranks, and
        CPU ranks that share no cache): a transfer's blocks are gathered to, or scattered
        from, rank 0's staging region of whole-head blocks, over the compute group."""
        return self.tp is not None and self.tp.rank == 0 and not self._shares_kv_cache

    @property
    def _transfer_cache_is_own(self) -> bool:
        """Whether rank 0 keeps a transfer staging region of whole-head blocks (private KV in
        an engine that transfers KV: config.kv_transfer). Without it, KV transfer is refused
        (_check_kv_transfer) and nothing is staged."""
        return self._private_kv and self.config.kv_transfer

    def _staging_blocks(self, scheduler: SchedulerConfig) -> int:
        """The staging region's blocks: the config's, or one max_model_len sequence's plus
        one step's prompt tokens (a step's finished prompts stage while a longest one ships)."""
        if self.config.kv_staging_blocks is not None:
            return self.config.kv_staging_blocks
        length = self.config.max_model_len or self.model_config.max_position_embeddings
        if self.config.num_kv_blocks is not None:  # no sequence outgrows the cache
            length = min(length, self.config.num_kv_blocks * self.config.block_size)
        tokens = length + scheduler.max_num_batched_tokens
        return -(-tokens // self.config.block_size)

    def _check_staging_holds_a_sequence(self) -> None:
        """Refuse a staging region that cannot hold one max_model_len sequence: its KV could
        never ship or land (a transfer goes through staging whole)."""
        if self.transfer_region is None:
            return
        needed = -(-self.max_model_len // self.config.block_size)
        if needed > self.transfer_region.num_blocks:
            self._stop_ranks_at_start()
            raise ValueError(
                f"kv_staging_blocks={self.transfer_region.num_blocks} cannot hold one sequence of "
                f"max_model_len={self.max_model_len} tokens ({needed} blocks of "
                f"{self.config.block_size}), whose KV a transfer moves through it whole: raise "
                f"kv_staging_blocks to >= {needed} or lower max_model_len"
            )

    def _check_kv_transfer(self, field: str) -> None:
        """Refuse a request that would ship or receive KV (`field` names how) where there is
        no cache for a transfer: private-KV TP without config.kv_transfer."""
        if self._private_kv and not self.config.kv_transfer:
            assert self.tp is not None
            raise InvalidRequest(
                field,
                f"KV transfer to or from this tensor-parallel engine (tensor_parallel_size="
                f"{self.tp.world_size}, its ranks holding their own KV heads) needs "
                f"EngineConfig.kv_transfer=True (a disaggregated pool's worker), which keeps "
                f"a transfer staging region on rank 0",
            )

    def rank_kv_heads(self) -> list[tuple[int, int]]:
        """Each rank's KV heads (first, count) under TP, in rank order."""
        assert self.tp is not None
        world = self.tp.world_size
        layouts = [shard_layout(self.model_config, world, rank) for rank in range(world)]
        return [(s.kv_head_start, s.num_kv_heads) for s in layouts]

    def _gather_transfer_kv(self, block_ids: SequenceOf[int], staging_ids: SequenceOf[int]) -> None:
        """Private KV (rank 0): every rank's heads of `block_ids` into the staging blocks
        `staging_ids` a transfer reads. Raises RankFailed."""
        assert self.tp is not None
        if not block_ids:
            return
        self.tp.request_kv(list(block_ids), gather=True)
        heads = self.rank_kv_heads()
        self.tp.gather_kv(self.runner.kv_cache, list(block_ids), heads, list(staging_ids))

    def _scatter_transfer_kv(
        self, block_ids: SequenceOf[int], staging_ids: SequenceOf[int]
    ) -> None:
        """Private KV (rank 0): each rank's heads of `block_ids` from the staging blocks
        `staging_ids` (where a transfer landed them) into its own cache. Raises RankFailed."""
        assert self.tp is not None
        if not block_ids:
            return
        self.tp.request_kv(list(block_ids), gather=False)
        heads = self.rank_kv_heads()
        self.tp.scatter_kv(self.runner.kv_cache, list(block_ids), heads, list(staging_ids))

    @property
    def transfer_kv_cache(self) -> torch.Tensor:
        """The cache KV transfer reads and writes, every KV head of the model:
        [layers, 2, num_blocks, block_size, num_kv_heads, row]. At TP=1 the runner's own;
        under TP (rank 0) the one all ranks share, or (private KV) rank 0's staging region,
        `transfer_region.num_blocks` blocks with ids of their own, which hold a transfer's KV only
        between a gather (kept KV: KeptKV.staging_ids) and its transfer's end, or between its
        landing (reserve_transfer's ids) and its scatter (attach_kv)."""
        if self.tp is None:
            return self.runner.kv_cache
        self._check_kv_transfer("kv_transfer")
        assert self.tp.whole_kv_cache is not None, "rank 0 holds a staging region"
        return self.tp.whole_kv_cache

    @property
    def shard(self) -> ShardLayout | None:
        """This rank's part of the model under tensor parallelism; None at TP=1."""
        if self.tp is None:
            return None
        return shard_layout(self.model_config, self.tp.world_size, self.tp.rank)

    def _num_kv_blocks(self) -> int:
        """Blocks that fit (every rank the same: the fewest any rank can hold, under TP)."""
        per_token = build.kv_bytes_per_token(
            self.model.config, self.kv_dtype, self.dtype, self.config.kv_cache_scales
        )
        staging_bytes = 0
        if self.transfer_region is not None:  # rank 0: its heads, and the region's whole blocks
            assert self.shard is not None
            whole_per_token = per_token * self.model_config.num_kv_heads // self.shard.num_kv_heads
            staging_bytes = (
                whole_per_token * self.config.block_size * self.transfer_region.num_blocks
            )
        try:
            fit = build.kv_blocks_that_fit(self.config, self.device, per_token, staging_bytes)
        except ValueError:
            self._stop_ranks_at_start()
            raise
        return fit if self.tp is None else self.tp.agree_min(fit)

    def _stop_ranks_at_start(self) -> None:
        """Rank 0 refusing its configuration at start-up: kill the ranks it started (they
        would wait for it without limit)."""
        if self.tp is not None and self.tp.followers is not None:
            self.tp.followers.kill()
            self.tp.failure = RankFailed("the engine was refused at start-up")

    # ---- requests ----------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        *,
        prompt_token_ids: SequenceOf[int] | None = None,
        messages: SequenceOf[Mapping[str, Any] | ChatMessage] | None = None,
        cache_salt: str | None = None,
        keep_kv: bool = False,
        prefill_only: bool = False,
        resumed_token_ids: SequenceOf[int] = (),
    ) -> list[int]:
        """Queue a request given as text, chat messages or token ids (exactly one).

        keep_kv: when the request finishes (not when aborted), pin the blocks of its computed
        tokens instead of letting them go, for a KV transfer to another worker; collect them
        with `take_kept_kv` and unpin with `block_manager.release(handle.owner)`.
        prefill_only: compute the prompt and sample the first token, then stop in the state
        "prefill done, KV held for transfer": `step` gives no output for it; it ends as a
        `Prefilled` from `take_prefilled` (the decode side continues it: add_remote_request).
        resumed_token_ids: output tokens this request already produced elsewhere (a replay
        after its worker was lost): they are computed with the prompt, count as output
        (max_tokens, penalties, the seeded draw's position, usage), and their text is taken as
        already sent; generation goes on from the next token.

        Returns the prompt's token ids. Raises InvalidRequest naming the bad field.
        """
        params = sampling_params or SamplingParams()
        self._check_request(request_id, params)
        if keep_kv or prefill_only:
            self._check_kv_transfer("keep_kv" if keep_kv else "prefill_only")
        token_ids = self.tokenize_prompt(prompt, prompt_token_ids, messages)
        seq = self._new_sequence(request_id, token_ids, params, cache_salt, resumed_token_ids)
        self._register(seq, with_text=not prefill_only)
        if keep_kv:
            self._keep_kv.add(request_id)
        if prefill_only:
            self._prefill_only.add(request_id)
        self.scheduler.add(seq)
        return token_ids

    def add_transferred_request(
        self,
        request_id: str,
        prompt_token_ids: SequenceOf[int],
        first_token_id: int,
        sampling_params: SamplingParams,
        *,
        kv_owner: str | None,
        cache_salt: str | None = None,
    ) -> RequestOutput:
        """`add_remote_request` and, unless the first token ends the request, `attach_kv`
        (whose blocks are freed at once if it does). Returns the first token's output; raises
        as those two do (a request refused by attach_kv is not kept)."""
        output = self.add_remote_request(
            request_id, prompt_token_ids, first_token_id, sampling_params, cache_salt=cache_salt
        )
        if output.finished:
            if kv_owner is not None:
                self.block_manager.release(kv_owner)
            return output
        try:
            self.attach_kv(request_id, kv_owner)
        except ValueError:
            self.abort_request(request_id)
            raise
        return output

    def add_remote_request(
        self,
        request_id: str,
        prompt_token_ids: SequenceOf[int],
        first_token_id: int,
        sampling_params: SamplingParams,
        *,
        cache_salt: str | None = None,
        logprobs: TokenLogprobs | None = None,
        prefill_usage: Usage | None = None,
        resumed_token_ids: SequenceOf[int] = (),
    ) -> RequestOutput:
        """Take over a request another worker prefilled (prefill_only), which sampled
        `first_token_id`, before its prompt's KV is here. This engine owns the request's text
        from the first token on: the token is turned into text and checked for a finish now
        (EOS, stop ids and strings, max_tokens, the context end), so the caller can stream it
        at once. Unless that output is finished, the sequence then waits (AWAITING_KV, not
        scheduled) for `attach_kv`. logprobs: the first token's, from the prefill;
        prefill_usage: its prefix-cache hits and queue time, reported as this request's.
        resumed_token_ids: as add_request's (a replayed request: they precede the first token,
        and the transferred KV covers the prompt and them).

        Returns the first token's output. Raises InvalidRequest like add_request.
        """
        params = sampling_params
        self._check_request(request_id, params)
        self._check_kv_transfer("first_token_id")  # its KV would come from another worker
        token_ids = list(prompt_token_ids)
        seq = self._new_sequence(request_id, token_ids, params, cache_salt, resumed_token_ids)
        check_token_id("first_token_id", first_token_id, self.model_config.vocab_size)
        self._register(seq)  # before the first token: its text state covers resumed tokens only
        seq.append_token(first_token_id)
        seq.status = SequenceStatus.AWAITING_KV
        if prefill_usage is not None:
            seq.num_cached_tokens = prefill_usage.cached_tokens
            seq.queue_seconds = prefill_usage.queue_seconds
        output = self.outputs.process_token(seq, logprobs)
        if output.finished:
            self._release(seq)
        return output

    def attach_kv(self, request_id: str, kv_owner: str | None) -> None:
        """Give a request waiting in AWAITING_KV its prompt's KV: the blocks `kv_owner` holds
        (a completed transfer's reservation) become the sequence's and its next step decodes
        from the first token. kv_owner None: the KV will not come (no room for it here); the
        prompt and first token are recomputed here, the sequence waiting for blocks like a
        preempted one. Either way it joins the next step scheduled (with overlap_outputs, the
        one after the step in flight). Raises ValueError if the request is not awaiting KV, or
        `kv_owner` holds no blocks or too few for the prompt (the blocks stay the owner's)."""
        seq = self._sequences.get(request_id)
        if seq is None or seq.status is not SequenceStatus.AWAITING_KV:
            raise ValueError(f"attach_kv({request_id!r}): the request is not awaiting its KV")
        if kv_owner is None:
            self._release_prefix(request_id)
            seq.status = SequenceStatus.WAITING
            self.scheduler.add(seq)
            return
        # every token but the first one sampled elsewhere: the prompt (and resumed tokens)
        computed = seq.num_tokens - 1
        prefix_owner = self._prefix_holds.get(request_id)
        if prefix_owner is not None:
            held = len(self.block_manager.holds[prefix_owner])
            arrived = len(self.block_manager.holds.get(kv_owner, ()))
            needed = self.block_manager.num_blocks_for(computed)
            if held + arrived != needed:
                raise ValueError(
                    f"attach_kv({request_id!r}): {held} prefix blocks held here and {arrived} "
                    f"arrived, but the prompt needs {needed}"
                )
        if self.transfer_region is not None:  # landed in rank 0's region: each rank its heads
            self._unstage_landed(request_id, kv_owner)
        self.block_manager.adopt(
            kv_owner, seq, num_computed_tokens=computed, prefix_owner=prefix_owner
        )
        self._prefix_holds.pop(request_id, None)
        self.block_manager.cache_computed_blocks(seq)
        # Last in the running batch (the newest, so the first preempted). A step in flight
        # (config.overlap_outputs) was planned without it and is kept: it decodes in the step
        # after, behind anything that step admitted (which joined the batch first).
        self.scheduler.add_running(seq)

    def _unstage_landed(self, request_id: str, kv_owner: str) -> None:
        """Scatter the KV a transfer landed in `kv_owner`'s staging blocks to every rank's
        blocks of the owner, then free the staging blocks. Raises ValueError if the owner
        holds blocks but no staging (not reserved with reserve_transfer), RankFailed."""
        assert self.transfer_region is not None
        blocks = self.block_manager.holds.get(kv_owner)
        if not blocks:
            return  # adopt refuses it by name
        staged = self.transfer_region.ids_of(kv_owner)
        if staged is None:
            raise ValueError(
                f"attach_kv({request_id!r}): {kv_owner!r} holds no staging blocks (reserve "
                f"for a transfer with reserve_transfer)"
            )
        self._scatter_transfer_kv(blocks, staged)
        self.transfer_region.free(kv_owner)

    def reserve_transfer(self, owner: str, num_blocks: int) -> list[int] | None:
        """A receiver's destination for `num_blocks` blocks of incoming KV (kvtransfer's
        ReserveFn; any thread): fresh blocks held by `owner` and, under private KV, as many
        staging blocks. Returns the ids a transfer writes in transfer_kv_cache (the staging
        ids, else the blocks'), or None, holding nothing, if either kind is short (a transfer
        larger than the whole staging region included). A short staging region evicts no
        cached block (the receiver retries a waiting offer every turn). Raises ValueError as
        BlockManager.reserve does."""
        if self.transfer_region is None:
            return self.block_manager.reserve(owner, num_blocks)
        return self.block_manager.reserve_staged(owner, num_blocks)

    def may_wait_for_room(self, num_blocks: int) -> bool:
        """Whether a transfer of `num_blocks` that found no room (reserve_transfer None)
        should wait for some rather than be refused (kvtransfer's WaitForRoomFn; any thread):
        under private KV if only the staging region is short (it frees as landed KV is
        attached) and the transfer fits it at all; never if this engine's own blocks are short
        (answered at once, as at TP=1)."""
        return (
            self.transfer_region is not None
            and num_blocks <= self.transfer_region.num_blocks
            and num_blocks <= self.block_manager.num_free_blocks
        )

    def kept_suffix(self, kept: KeptKV, num_skipped_blocks: int) -> KeptKV:
        """`kept` less its first `num_skipped_blocks` blocks (the receiver has them): a new
        owner holds the later blocks and their staging blocks; the earlier ones go back at
        once (kept.owner holds nothing afterwards). Any thread. Raises KVTransferError,
        holding nothing, if kept.owner no longer holds its blocks and staging (released
        meanwhile: an abort, a failure)."""
        owner = f"{kept.owner}:suffix"
        staged = self.block_manager.split_hold(kept.owner, owner, num_skipped_blocks)
        if staged is None or tuple(staged) != kept.staging_ids[num_skipped_blocks:]:
            self.block_manager.release(owner)
            self.block_manager.release(kept.owner)
            raise KVTransferError(
                f"kept KV {kept.owner!r} was released (or lost its staging blocks) before its "
                f"suffix could ship"
            )
        return KeptKV(
            owner,
            kept.block_ids[num_skipped_blocks:],
            kept.num_tokens - num_skipped_blocks * self.block_manager.block_size,
            tuple(staged),
        )

    def hold_prefix(self, request_id: str, num_tokens: int) -> bool:
        """For a request awaiting KV (add_remote_request) that will carry only its prompt from
        token `num_tokens` on: hold this engine's cached blocks of the tokens before it now,
        so that no eviction takes them before the rest arrives; attach_kv puts them first in
        its block table. False, holding nothing, unless all of them are cached here. Raises
        ValueError if the request is not awaiting KV, holds a prefix already, or `num_tokens`
        is not a whole number of blocks inside the prompt (leaving >= 1 token to arrive)."""
        seq = self._sequences.get(request_id)
        if seq is None or seq.status is not SequenceStatus.AWAITING_KV:
            raise ValueError(f"hold_prefix({request_id!r}): the request is not awaiting its KV")
        if request_id in self._prefix_holds:
            raise ValueError(f"hold_prefix({request_id!r}): it holds a prefix already")
        size = self.block_manager.block_size
        if num_tokens % size or not 0 < num_tokens < seq.num_prompt_tokens:
            raise ValueError(
                f"hold_prefix({request_id!r}): num_tokens={num_tokens} must be a multiple of the "
                f"block size {size} in (0, {seq.num_prompt_tokens})"
            )
        owner = f"prefix:{request_id}#{next(self._kept_numbers)}"
        hashes = seq.full_block_hashes(size)[: num_tokens // size]
        if self.block_manager.hold_cached(owner, hashes) is None:
            return False
        self._prefix_holds[request_id] = owner
        return True

    def _release_prefix(self, request_id: str) -> None:
        owner = self._prefix_holds.pop(request_id, None)
        if owner is not None:
            self.block_manager.release(owner)

    def _check_request(self, request_id: str, params: SamplingParams) -> None:
        waiting = any(u.request_id == request_id for u in self._unstaged)
        if request_id in self._sequences or request_id in self._kept_kv or waiting:
            raise InvalidRequest("request_id", f"{request_id!r} is already in use")
        params.validate(self.model_config.vocab_size)
        if params.stop and self.tokenizer is None:
            raise InvalidRequest("stop", f"model {self.model_id} has no tokenizer to match text")

    def _new_sequence(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        salt: str | None,
        resumed_token_ids: SequenceOf[int] = (),
    ) -> Sequence:
        validate_prompt_token_ids(
            token_ids, self.model_config.vocab_size, self.max_model_len, params.max_tokens
        )
        seq = Sequence(request_id, token_ids, params, root_hash(self.model_id, salt))
        if resumed_token_ids:
            self._check_resumed(seq, resumed_token_ids)
            seq.token_ids.extend(resumed_token_ids)
        return seq

    def _check_resumed(self, seq: Sequence, resumed: SequenceOf[int]) -> None:
        """Resumed output tokens must be in the vocabulary and leave room for the next one."""
        for token_id in resumed:
            check_token_id("resumed_token_ids", token_id, self.model_config.vocab_size)
        if len(resumed) >= seq.sampling_params.max_tokens:
            raise InvalidRequest(
                "resumed_token_ids", f"{len(resumed)} tokens resumed, max_tokens is "
                f"{seq.sampling_params.max_tokens}: nothing is left to generate",
            )  # fmt: skip
        if seq.num_prompt_tokens + len(resumed) + 1 > self.max_model_len:
            raise InvalidRequest(
                "resumed_token_ids", f"prompt and {len(resumed)} resumed tokens leave no room "
                f"in the {self.max_model_len}-token context",
            )  # fmt: skip

    def _register(self, seq: Sequence, with_text: bool = True) -> None:
        bias = LogitBias.of(seq.sampling_params, self.device)
        if bias is not None:
            self._logit_biases[seq.request_id] = bias
        self._sequences[seq.request_id] = seq
        if with_text:
            self.outputs.add(seq)

    def take_prefilled(self) -> list[Prefilled]:
        """The prefill_only requests that ended since the last call (each once)."""
        prefilled, self._prefilled = self._prefilled, []
        return prefilled

    def take_kept_kv(self, request_id: str) -> KeptKV | KVPending | None:
        """The pinned KV of a finished `keep_kv` request (once); KVPending.STAGING while it
        waits for staging blocks (step on, then take it, or abort_request to free it); None
        if there is none."""
        if any(u.request_id == request_id for u in self._unstaged):
            return KVPending.STAGING
        return self._kept_kv.pop(request_id, None)

    @property
    def num_kv_waiting_for_staging(self) -> int:
        """Finished requests whose kept KV waits for staging blocks now (back-pressure)."""
        return len(self._unstaged)

    def tokenize_prompt(
        self,
        prompt: str | None,
        prompt_token_ids: SequenceOf[int] | None,
        messages: SequenceOf[Mapping[str, Any] | ChatMessage] | None,
    ) -> list[int]:
        given = [x for x in (prompt, prompt_token_ids, messages) if x is not None]
        if len(given) != 1:
            raise InvalidRequest("prompt", "give exactly one of prompt, prompt_token_ids, messages")
        if prompt_token_ids is not None:
            return list(prompt_token_ids)
        if self.tokenizer is None:
            raise InvalidRequest(
                "prompt", f"model {self.model_id} has no tokenizer; pass prompt_token_ids"
            )
        if messages is not None:
            text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        assert prompt is not None
        if not prompt:
            raise InvalidRequest("prompt", "prompt is empty")
        return self.tokenizer.encode(prompt)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its KV now (KV kept for it, not taken yet or still waiting
        for staging blocks, too). Returns its closing output (finish reason ABORT), also for a
        prefill_only request whose result waited for staging blocks (its caller still waits
        for it); None if it is unknown or already finished. A request in the step in flight
        (config.overlap_outputs) first lets the device finish that step (its KV writes land
        before its blocks are freed); the step is kept, its result for the request dropped.
        If that step admitted the request, its usage is a scheduled request's (cached_tokens,
        queue_seconds: its prefill ran), where the synchronous engine would not have admitted
        it yet."""
        dropped = self._drop_kept(request_id)
        seq = self._sequences.pop(request_id, None)
        if seq is not None:
            self._wait_if_in_flight(seq)
        if seq is None:
            if dropped is None or dropped.prefilled is None:
                return None
            usage = dropped.prefilled.usage
            return RequestOutput(request_id, (), "", True, FinishReason.ABORT, usage)
        self.scheduler.finish(seq, FinishReason.ABORT)
        self._logit_biases.pop(request_id, None)
        self._keep_kv.discard(request_id)
        self._prefill_only.discard(request_id)
        self._release_prefix(request_id)
        return self.outputs.finish(seq, FinishReason.ABORT)

    def export_request(self, request_id: str) -> Prefilled | None:
        """Take a running request out to continue it on another worker (a drain moving it,
        issue 22.3): its KV up to its last token (sampled, its output sent, not yet computed)
        is pinned for a transfer and the request leaves without a finish reason or a closing
        output, as a prefill_only one does. The result's `first_token_id` is that last token;
        the receiving engine takes it over with add_remote_request, the tokens before it as
        resumed_token_ids. None, leaving it here, unless it is running with all its tokens
        but the last computed (waiting, mid-prefill, awaiting KV: it is replayed instead)."""
        seq = self._sequences.get(request_id)
        if (
            seq is None
            or request_id in self._prefill_only
            or seq.status is not SequenceStatus.RUNNING
            or seq.num_computed_tokens != seq.num_tokens - 1
            or seq.num_output_tokens < 1
        ):
            return None
        self._wait_if_in_flight(seq)
        usage = seq.usage()
        kept = self._pin_kv(seq)
        assert kept is not None, f"{seq} is running without computed KV"
        if not self._is_staged(kept):  # no staging blocks now: it stays, and is replayed
            self.block_manager.release(kept.owner)
            return None
        self.outputs.forget(seq)
        self._keep_kv.discard(request_id)
        self._forget(seq, None)
        return Prefilled(request_id, seq.token_ids[-1], None, usage, kept)

    def _pin_kv(self, seq: Sequence) -> KeptKV | None:
        """Pin `seq`'s computed KV for a transfer and, under private KV, stage it if staging
        blocks are free and no kept KV waits for them ahead of it (else it is returned
        unstaged: _is_staged). None if it has no computed KV. Raises RankFailed (nothing
        pinned then)."""
        num_tokens = seq.num_computed_tokens
        if num_tokens == 0:
            return None
        block_ids = seq.block_ids[: self.block_manager.num_blocks_for(num_tokens)]
        # Unique per keep: KV kept earlier under the same request id may still be shipping.
        owner = f"kept:{seq.request_id}#{next(self._kept_numbers)}"
        self.block_manager.hold(owner, block_ids)
        kept = KeptKV(owner, tuple(block_ids), num_tokens)
        if self.transfer_region is None or self._unstaged:
            return kept
        return self._stage(kept) or kept

    def _is_staged(self, kept: KeptKV) -> bool:
        """Whether a transfer can read `kept` now (always, without a staging region)."""
        return self.transfer_region is None or bool(kept.staging_ids)

    def _stage(self, kept: KeptKV) -> KeptKV | None:
        """Private KV (rank 0): gather every rank's heads of `kept` into staging blocks its
        owner holds; None (nothing taken) if too few are free now. Raises RankFailed, the
        owner's blocks and staging released."""
        assert self.transfer_region is not None
        staging_ids = self.transfer_region.allocate(kept.owner, len(kept.block_ids))
        if staging_ids is None:
            return None
        try:
            self._gather_transfer_kv(kept.block_ids, staging_ids)
        except BaseException:
            self.block_manager.release(kept.owner)  # its blocks and staging: nothing to ship
            raise
        return dataclasses.replace(kept, staging_ids=tuple(staging_ids))

    def _stage_waiting(self) -> None:
        """Stage kept KV that waits for staging blocks, oldest first, while they are free;
        each staged one ends as it would have at once (take_prefilled, take_kept_kv)."""
        while self._unstaged:
            waiting = self._unstaged[0]
            kept = self._stage(waiting.kept)
            if kept is None:
                return
            self._unstaged.popleft()
            if waiting.prefilled is not None:
                self._prefilled.append(dataclasses.replace(waiting.prefilled, kv=kept))
            else:
                self._kept_kv[waiting.request_id] = kept

    def _drop_kept(self, request_id: str) -> _Unstaged | None:
        """Release the kept KV of `request_id` that nobody took (take_kept_kv) or that waits
        for staging blocks: its result was never handed out, so nobody else would. The one
        that waited, if any (its prefill's result never came out)."""
        kept = self._kept_kv.pop(request_id, None)
        if kept is not None:
            self.block_manager.release(kept.owner)
        for waiting in list(self._unstaged):
            if waiting.request_id == request_id:
                self._unstaged.remove(waiting)
                self.block_manager.release(waiting.kept.owner)
                return waiting
        return None

    def _keep_or_wait(self, request_id: str, kept: KeptKV, prefilled: Prefilled | None) -> None:
        """Hand kept KV out (take_prefilled with `prefilled`, else take_kept_kv) once staged:
        now, or when staging blocks free (back-pressure: the prefill's result waits)."""
        if self._is_staged(kept):
            if prefilled is not None:
                self._prefilled.append(prefilled)
            else:
                self._kept_kv[request_id] = kept
            return
        self._unstaged.append(_Unstaged(request_id, kept, prefilled))
        self.num_kv_staging_waits += 1

    def has_unfinished_requests(self) -> bool:
        """Whether a step has work: sequences, kept KV waiting for staging blocks, a launched
        step to collect or a launch's error to raise (config.overlap_outputs)."""
        return (
            self.scheduler.num_unfinished > 0
            or bool(self._unstaged)
            or self._in_flight is not None
            or self._launch_error is not None
        )

    # ---- the step loop -----------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns an output for every request that got a token.

        With config.overlap_outputs (and no tensor parallelism), the step after this one is
        scheduled and launched once this one's tokens are known and every finish decided, and
        this one's text and outputs are made while it runs; the next call collects it. If that
        launch raises, this call still returns this step's outputs and the next call raises
        the error (the synchronous engine would have returned them, then raised). A greedy
        decode step is followed by the next one launched before its own collection
        (FOLLOW_DECODES, _launch_following)."""
        if self._launch_error is not None:
            error, self._launch_error = self._launch_error, None
            raise error
        if self._unstaged:
            self._stage_waiting()
        launched, self._in_flight = self._in_flight or self._launch(), None
        if launched is None:
            if self._unstaged:  # nothing to run: wait a little for a transfer to free staging
                assert self.transfer_region is not None
                needed = len(self._unstaged[0].kept.block_ids)
                self.transfer_region.wait_for_free(needed, STAGING_WAIT_S)
            return []
        try:
            self._in_flight = self._launch_following(launched)
        except Exception as e:  # raised by the next call, after these outputs
            self._launch_error = e
            if self.device.type == "cuda":  # what it queued has run before anything is freed
                with contextlib.suppress(RuntimeError):  # a lost device: `e` tells already
                    torch.cuda.current_stream(self.device).synchronize()
        pending = self._collect(launched)
        following = self._in_flight
        if following is not None and all(seq.is_finished for seq in following.samplers):
            self._collect(following)  # every row of it finished in the step before: no output
            self._in_flight = following = None
        if following is None and self._launch_error is None and self.overlaps_outputs:
            try:  # unless its schedule could preempt (_launch checks)
                self._in_flight = self._launch(ahead=True)
            except Exception as e:  # raised by the next call, after these outputs
                self._launch_error = e
        return self._outputs_of(pending)

    @property
    def overlaps_outputs(self) -> bool:
        """config.overlap_outputs, resolved: None means on for CUDA, off on the CPU; never
        under tensor parallelism. Read at every step (a benchmark may switch it)."""
        overlap = self.config.overlap_outputs
        return (self.device.type == "cuda" if overlap is None else overlap) and self.tp is None

    def _launch(self, ahead: bool = False) -> _Launched | None:
        """Schedule a step and start it on the device (on the CPU: compute it); None if
        nothing is scheduled. ahead: launched before the last step's outputs are made (on
        CUDA, events around it time it and mark its end, for _wait_if_in_flight); None too
        if its schedule could preempt (the step is then launched by the next call: the
        preempted sequences' outputs of the last step would not be made yet, and a preemption
        is the one schedule decision best taken with the latest state)."""
        if ahead:
            # A KV receiver reserves blocks on its own thread (reserve_transfer): the check
            # that this schedule cannot preempt and the schedule are one hold of the block
            # manager's lock, or a reservation between them could make it preempt.
            with self.block_manager.exclusive():
                if self.scheduler.may_preempt():
                    return None
                scheduled = self.scheduler.schedule()
        else:
            scheduled = self.scheduler.schedule()
        if not scheduled.scheduled:
            return None
        samplers = [s.seq for s in scheduled.scheduled if s.samples_token]
        launched = self._start(scheduled, samplers, ahead, None)
        self.num_prompt_tokens_computed += _prompt_tokens_in(scheduled)
        if ahead:
            assert not scheduled.preempted, "a step that could preempt is not launched ahead"
        return launched

    def _launch_following(self, launched: _Launched) -> _Launched | None:
        """Launch the decode step after `launched` before `launched` is collected (see
        FOLLOW_DECODES), or None where that step could differ from what the scheduler would
        plan once `launched` is collected: `launched` must decode every running sequence, one
        token each, all plain greedy, with nothing waiting to join or to stage. Left out of
        the step: rows of sequences that ended already and sequences that `launched` ends by
        their length. Its new positions' blocks are allocated now (None if the free blocks do
        not cover them: that schedule might preempt)."""
        if not (FOLLOW_DECODES and self.overlaps_outputs and launched.greedy_ids is not None):
            return None
        if self.scheduler.waiting or self._unstaged or launched.scheduled.preempted:
            return None
        items, running = launched.scheduled.scheduled, self.scheduler.running
        if not running or len(launched.samplers) != len(items):
            return None
        live = [i for i, item in enumerate(items) if not item.seq.is_finished]
        if len(live) != len(running):
            return None
        rows: list[int] = []  # of `launched`: the sequences that decode on
        new_blocks: list[Sequence] = []
        block_manager = self.block_manager
        for i, seq in zip(live, running, strict=True):
            item = items[i]
            if (
                item.seq is not seq
                or item.num_new_tokens != 1
                or seq.num_computed_tokens + 1 != seq.num_tokens  # `launched` samples it
                or seq.request_id in self._prefill_only
                or seq.request_id in self._keep_kv
            ):
                return None
            if (
                seq.num_output_tokens + 1 >= seq.sampling_params.max_tokens
                or seq.num_tokens + 1 >= self.max_model_len
            ):
                continue  # `launched`'s token is its last
            rows.append(i)
            if block_manager.num_blocks_for(seq.num_tokens + 1) > len(seq.block_ids):
                new_blocks.append(seq)
        if not rows:
            return None
        with block_manager.exclusive():  # a KV receiver reserves blocks on its own thread
            if len(new_blocks) > block_manager.num_free_blocks:
                return None
            for seq in new_blocks:
                # room for `launched`'s token and the next one (its count not advanced yet)
                if not block_manager.allocate_slots(seq, 2):
                    raise RuntimeError(f"{seq}: no block for the step that follows")
        follows = launched.greedy_ids
        if len(rows) != len(items):
            follows = follows[_index_on(follows.device, rows)]
        seqs = [items[i].seq for i in rows]
        following = SchedulerOutput([ScheduledSequence(seq, 1) for seq in seqs], [])
        started = self._start(following, seqs, True, follows)
        self.num_steps_followed += 1
        return started

    def _start(
        self,
        scheduled: SchedulerOutput,
        samplers: list[Sequence],
        ahead: bool,
        follows: torch.Tensor | None,
    ) -> _Launched:
        """Run `scheduled` on the device (on the CPU: compute it). follows: the token ids, on
        the device, of the step in flight that this one follows (runner.execute)."""
        events = None
        if self._launch_events:  # CUDA
            self._events_turn ^= 1
            events = self._launch_events[self._events_turn]
        started = time.perf_counter()
        if events is not None:
            events[0].record()
        if self.tp is None:
            logits = self.runner.execute(scheduled, follows)
        else:
            assert follows is None, "no step follows another under tensor parallelism"
            logits = self._execute_on_all_ranks(scheduled)
        launch_s = time.perf_counter() - started
        if ahead:
            self.num_steps_launched_ahead += 1
        greedy = greedy_ids = None
        if (
            GREEDY_AT_LAUNCH
            and samplers
            and (logits.is_cuda or self.overlaps_outputs)
            and all(plain_greedy(seq.sampling_params) for seq in samplers)
        ):
            greedy, greedy_ids = self._greedy_ids(logits)
        if events is not None:
            events[1].record()  # after the argmax and its copy: waiting for it waits for both
        return _Launched(
            scheduled, samplers, logits, started, launch_s, ahead, events, greedy, greedy_ids
        )

    def _greedy_ids(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The argmax of each row, on the logits' device and in host memory. On CUDA it is
        queued behind the step on its stream and copied to pinned memory without waiting:
        valid once the step's end event (or the stream) is reached; two buffers in turn, so
        the copy of a step launched ahead never overwrites ids the last step's collection has
        not read. (On the CPU, with overlap_outputs, computed now: the same ids.)"""
        ids = logits.argmax(dim=-1)
        if not logits.is_cuda:
            return ids, ids
        rows = logits.shape[0]
        if self._greedy_host is None or self._greedy_host[0].shape[0] < rows:
            size = max(rows, self.scheduler.config.max_num_seqs)  # a step's rows, at most
            self._greedy_host = tuple(
                torch.empty(size, dtype=torch.long, pin_memory=True) for _ in range(2)
            )
        self._greedy_turn ^= 1
        host = self._greedy_host[self._greedy_turn][:rows]
        host.copy_(ids, non_blocking=True)
        return host, ids

    def _collect(self, launched: _Launched) -> list[_Pending]:
        """Sample a launched step's tokens (waiting for the device), advance its sequences and
        decide every finish, freeing what finished, as the synchronous step does in the same
        order. Returns what becomes the step's outputs (_outputs_of), text not made yet where it
        can wait. A sequence that left while the step was in flight (aborted, exported) is
        left out: its row of logits is dropped, nothing of it is applied."""
        scheduled, samplers, logits = launched.scheduled, launched.samplers, launched.logits
        kept_rows: list[int] | None = None
        if any(item.seq.is_finished for item in scheduled.scheduled):
            scheduled, samplers, logits, kept_rows = _without_finished(launched)
        waited = time.perf_counter()
        if launched.events is not None:
            launched.events[1].synchronize()
            waited = time.perf_counter()
        elif launched.greedy is not None and logits.is_cuda:  # the stream holds the copy
            torch.cuda.current_stream(logits.device).synchronize()
        for owner in launched.holds:  # the step has run: nothing reads or writes them now
            self.block_manager.release(owner)
        if launched.greedy is not None:
            ids = launched.greedy.tolist()
            if kept_rows is not None:
                ids = [ids[i] for i in kept_rows]
            sampled = SamplerOutput(ids, [None] * len(ids))
        elif all(plain_greedy(seq.sampling_params) for seq in samplers):
            sampled = self.sampler.greedy(logits)
        else:
            sampled = self.sampler(logits, [self._sample_row(seq) for seq in samplers])
        self.scheduler.observe_step(launched.num_tokens, _step_seconds(launched, waited))
        self.scheduler.update(scheduled, sampled.token_ids)
        pending: list[_Pending] = []
        defer = self.overlaps_outputs
        for seq, logprobs in zip(samplers, sampled.logprobs, strict=True):
            if seq.request_id in self._prefill_only:
                self._prefill_done(seq, logprobs)
                continue
            if defer and not self.outputs.needs_text_to_finish(seq):
                item: _Pending = (seq, logprobs, self.outputs.finish_by_token(seq))
            else:
                item = self.outputs.process_token(seq, logprobs)
            if seq.finish_reason is not None:
                self._hold_while_in_flight(seq)
                self._release(seq)
            pending.append(item)
        return pending

    def _hold_while_in_flight(self, seq: Sequence) -> None:
        """`seq` ends while the step in flight, which follows the one being collected, has its
        row: its blocks stay held until that step is collected (its KV write lands in them, its
        attention reads them), not handed meanwhile to a KV receiver, whose copies the device
        does not order after the step."""
        launched = self._in_flight
        if launched is not None and any(item.seq is seq for item in launched.scheduled.scheduled):
            owner = f"in-flight:{seq.request_id}#{next(self._kept_numbers)}"
            self.block_manager.hold(owner, seq.block_ids)
            launched.holds.append(owner)

    def _outputs_of(self, pending: list[_Pending]) -> list[RequestOutput]:
        """The collected step's outputs, made now where _collect left them for later."""
        token_output = self.outputs.token_output
        return [
            item if isinstance(item, RequestOutput) else token_output(*item) for item in pending
        ]

    def _wait_if_in_flight(self, seq: Sequence) -> None:
        """Before `seq` leaves (abort, export) while in the step in flight: let the device
        finish that step, so that its KV writes land before the blocks are freed or shipped.
        The step is kept; _collect leaves `seq` out of it."""
        launched = self._in_flight
        if launched is None or launched.events is None:
            return  # nothing in flight, or computed already (CPU)
        if any(item.seq is seq for item in launched.scheduled.scheduled):
            launched.events[1].synchronize()

    def _execute_on_all_ranks(self, scheduled: SchedulerOutput) -> torch.Tensor:
        """Rank 0 under TP: send the step's plan to the other ranks, run its own shard with
        them. Raises RankFailed (naming a dead rank, or the timeout) if any rank fails."""
        assert self.tp is not None
        self.tp.send_plan(encode_plan(scheduled))
        try:
            return self.runner.execute(scheduled)
        except RuntimeError as e:  # gloo / NCCL: a peer closed its connection, or the timeout
            raise self.tp.fail(e) from e

    def dead_ranks(self) -> str | None:
        """Which tensor-parallel ranks have exited, without a collective (any thread; an idle
        engine finds out no other way): "rank 1 (pid p) exited with code -9", or None."""
        followers = self.tp.followers if self.tp is not None else None
        dead = followers.dead_ranks(0.0) if followers is not None else []
        return f"tensor-parallel rank gone: {'; '.join(dead)}" if dead else None

    def close(self) -> None:
        """Stop the other tensor-parallel ranks and wait for them to exit (rank 0; nothing to do
        at TP=1). Idempotent; the engine cannot step afterwards under TP."""
        if self.tp is not None and self.tp.rank == 0:
            self.tp.stop()
            self.tp.failure = self.tp.failure or RankFailed("the engine was closed")

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sample_row(self, seq: Sequence) -> SampleRow:
        return SampleRow(
            seq.sampling_params,
            seq.prompt_token_ids,
            seq.output_token_ids,
            seq.sampling_params.seed,
            self._logit_biases.get(seq.request_id),
        )

    def _release(self, seq: Sequence) -> None:
        assert seq.finish_reason is not None, "released sequences have a finish reason"
        if seq.request_id in self._keep_kv:
            self._keep_kv.discard(seq.request_id)
            kept = self._pin_kv(seq)
            if kept is not None:
                self._keep_or_wait(seq.request_id, kept, None)
        self._forget(seq, seq.finish_reason)

    def _prefill_done(self, seq: Sequence, logprobs: TokenLogprobs | None) -> None:
        """End a prefill_only sequence whose first token was just sampled: pin its prompt's
        KV, leave without a finish reason (none was reached) and without text. Its Prefilled
        comes out of take_prefilled once the KV is staged (at once without staging)."""
        self._prefill_only.discard(seq.request_id)
        usage = seq.usage()
        kept = self._pin_kv(seq)
        assert kept is not None, f"{seq} sampled a token without computed KV"
        self._forget(seq, None)
        prefilled = Prefilled(seq.request_id, seq.token_ids[-1], logprobs, usage, kept)
        self._keep_or_wait(seq.request_id, kept, prefilled)

    def _forget(self, seq: Sequence, reason: FinishReason | None) -> None:
        self._release_prefix(seq.request_id)
        self.scheduler.finish(seq, reason)
        del self._sequences[seq.request_id]
        self._logit_biases.pop(seq.request_id, None)

    # ---- conveniences ------------------------------------------------------------------

    def generate(
        self,
        prompts: SequenceOf[str | list[int]],
        sampling_params: SamplingParams | None = None,
    ) -> list[Completion]:
        """Run prompts (texts or token id lists) to completion together; results in order."""
        ids = [f"generate-{next(self._generate_ids)}" for _ in prompts]
        for request_id, prompt in zip(ids, prompts, strict=True):
            if isinstance(prompt, str):
                self.add_request(request_id, prompt, sampling_params)
            else:
                self.add_request(request_id, None, sampling_params, prompt_token_ids=list(prompt))
        results = {request_id: _Accumulator() for request_id in ids}
        while self.has_unfinished_requests():
            for output in self.step():
                results[output.request_id].add(output)
        return [results[i].completion(i) for i in ids]

    def stream(
        self,
        request_id: str,
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        *,
        prompt_token_ids: SequenceOf[int] | None = None,
        messages: SequenceOf[Mapping[str, Any] | ChatMessage] | None = None,
        cache_salt: str | None = None,
    ) -> Iterator[RequestOutput]:
        """Add one request and yield its outputs as they come (other requests advance too).
        Closing the iterator early aborts the request."""
        self.add_request(
            request_id,
            prompt,
            sampling_params,
            prompt_token_ids=prompt_token_ids,
            messages=messages,
            cache_salt=cache_salt,
        )
        try:
            while request_id in self._sequences:
                for output in self.step():
                    if output.request_id == request_id:
                        yield output
        finally:
            self.abort_request(request_id)

    def check_integrity(self, holders: SequenceOf[str] = ()) -> None:
        """Assert the KV bookkeeping is consistent and only `holders` (plus kept KV not yet
        taken) hold blocks outside sequences."""
        kept = [k.owner for k in self._kept_kv.values()]
        kept += [p.kv.owner for p in self._prefilled]
        kept += [u.kept.owner for u in self._unstaged]
        kept += list(self._prefix_holds.values())
        if self._in_flight is not None:
            kept += self._in_flight.holds
        self.scheduler.check_integrity(holders=[*holders, *kept])


def _prompt_tokens_in(scheduled: SchedulerOutput) -> int:
    """How many of a step's tokens are prompt tokens (prefill chunks, before the step runs)."""
    num_tokens = 0
    for item in scheduled.scheduled:
        seq = item.seq
        computed = seq.num_computed_tokens
        if computed < len(seq.prompt_token_ids):  # a decode step counts none
            num_tokens += min(computed + item.num_new_tokens, len(seq.prompt_token_ids)) - computed
    return num_tokens


@dataclass(frozen=True, slots=True)
class _Launched:
    """A step started on the device and not collected yet: its plan, its logits (for a CUDA
    graph, the graph's output buffer: valid until the next replay), when it started and how
    long its launch took on the host, whether it was launched ahead, and (CUDA) events
    recorded before and after it."""

    scheduled: SchedulerOutput
    samplers: list[Sequence]  # the sequences that sample a token, in the logits' row order
    logits: torch.Tensor  # [num_sampling_seqs, vocab] fp32
    started: float  # time.perf_counter()
    launch_s: float  # the host's time in runner.execute (on the CPU: the whole compute)
    ahead: bool
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None
    # every sampler plain greedy (CUDA, or overlap_outputs): the rows' argmax in host memory
    # (CUDA: pinned, copied behind the step, ready once events[1], or the stream, is reached)
    # and on the device (what a step following this one reads); None: sample at collection
    greedy: torch.Tensor | None = None
    greedy_ids: torch.Tensor | None = None
    # block holds of sequences that ended while it was in flight, released at its collection
    holds: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.scheduled.num_tokens


def _index_on(device: torch.device, rows: list[int]) -> torch.Tensor:
    """`rows` as an int64 tensor on `device`, copied without making the host wait for the
    device (from pinned memory on CUDA; a pageable copy would wait for the stream)."""
    if device.type != "cuda":
        return torch.tensor(rows, dtype=torch.long, device=device)
    host = torch.tensor(rows, dtype=torch.long, pin_memory=True)
    return host.to(device, non_blocking=True)


def _without_finished(
    launched: _Launched,
) -> tuple[SchedulerOutput, list[Sequence], torch.Tensor, list[int]]:
    """A step in flight less its sequences that left meanwhile (aborted, exported: their
    counts were reset when their blocks were freed): the plan, samplers and rows of logits
    of those that remain (all rows when the launch took greedy ids: unused then), and those
    rows' indices (into the launch's samplers)."""
    scheduled = launched.scheduled
    kept = [item for item in scheduled.scheduled if not item.seq.is_finished]
    rows = [i for i, seq in enumerate(launched.samplers) if not seq.is_finished]
    samplers = [launched.samplers[i] for i in rows]
    logits = launched.logits
    if launched.greedy is None:  # else the ids are on the host already: no gather, no copy
        logits = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
    return SchedulerOutput(kept, scheduled.preempted), samplers, logits, rows


def _step_seconds(launched: _Launched, sampled_from: float) -> float:
    """A step's time for the step-time model (target_itl_s caps a step's tokens by it): what
    the step itself costs, launch to sampled tokens. Synchronously that is the wall time from
    launch to the end of sampling (now). A step launched ahead would also count, that way,
    the host's work between its launch and its collection (the last step's outputs, the
    caller's work), which its tokens do not drive and which runs beside the device: it counts
    its device time instead (CUDA: its events; the CPU computes it inside the launch) and its
    sampling, from `sampled_from` (after waiting for the device) to now."""
    now = time.perf_counter()
    if not launched.ahead:
        return now - launched.started
    if launched.events is None:
        return launched.launch_s + now - sampled_from
    device_s = launched.events[0].elapsed_time(launched.events[1]) / 1e3
    return device_s + now - sampled_from


# A collected step's output: made already, or (sequence, logprobs, token finish) to make
_Pending = RequestOutput | tuple[Sequence, TokenLogprobs | None, FinishReason | None]


@dataclass(frozen=True, slots=True)
class _Unstaged:
    """Kept KV pinned but waiting for staging blocks: a prefill's (`prefilled`) or a keep_kv
    request's (prefilled None)."""

    request_id: str
    kept: KeptKV
    prefilled: Prefilled | None


class _Accumulator:
    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.text: list[str] = []
        self.last: RequestOutput | None = None

    def add(self, output: RequestOutput) -> None:
        self.token_ids += output.new_token_ids
        self.text.append(output.text_delta)
        self.last = output

    def completion(self, request_id: str) -> Completion:
        assert self.last is not None and self.last.finish_reason is not None
        return Completion(
            request_id, self.token_ids, "".join(self.text), self.last.finish_reason, self.last.usage
        )

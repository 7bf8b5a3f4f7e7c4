"""Tensor parallelism inside one engine: the ranks' process groups, starting and stopping the
ranks, and the step plan rank 0 sends to the others.

Every rank builds the same Engine over its own shard (engine.sharding); only rank 0 schedules,
samples and talks to anyone else. A gloo "control" group carries plans (int64 tensors, never
pickles) and the stop message; a "compute" group (NCCL on CUDA, gloo on CPU) the forward's
collectives. No default process group is created; a TP=1 engine creates none. Any failed
collective becomes RankFailed on rank 0, which kills the rest. The picture: docs/engine.md.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F

from contracts.errors import RankFailed
from engine.scheduler import ScheduledSequence, SchedulerOutput
from engine.sequence import Sequence

if TYPE_CHECKING:
    from engine.config import EngineConfig

logger = logging.getLogger(__name__)

# A c10d backend (ProcessGroupGloo, ProcessGroupNCCL) used directly: collectives on it need no
# default process group.
Backend = Any

HOST = "127.0.0.1"  # the ranks of one engine share a host
STARTUP_TIMEOUT_S = 600.0  # every rank loads its shard and reports ready within this
_FOLLOWER_WAIT = timedelta(days=365)  # followers wait for the next plan as long as it takes
_PLAN_STEP, _PLAN_STOP, _PLAN_GATHER_KV, _PLAN_SCATTER_KV = 1, 2, 3, 4
# KV moved between the ranks for a transfer (private caches): one gather or scatter per chunk of
# layers, each rank's part of a chunk at most this many bytes (bounds rank 0's scratch memory)
KV_MOVE_CHUNK_BYTES = 64 << 20
_LOG_LEVEL_ENV = "TANDEM_TP_LOG_LEVEL"
_EXIT_WAIT_S = 2.0  # after a failed collective: how long to wait for a dead rank's exit code
KV_SHARE_DIR = "/dev/shm"  # CPU ranks map their shared KV cache from a file here
_SHARE_DIR_ENV = "TANDEM_TP_SHARE_DIR"


class TensorParallelGroup:
    """One rank's view of its engine's ranks: collectives for the model, plans for the loop.

    Rank 0 also owns the follower processes (`followers`). Called from the one thread that
    drives the engine.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        store: dist.Store,
        device: torch.device,
        timeout_s: float,
        followers: Followers | None = None,
        compute_on_gloo: bool = False,
    ) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.timeout_s = timeout_s
        self.store = store
        self.followers = followers
        self.failure: RankFailed | None = None
        # [layers, 2, blocks, block_size, every KV head, row] (rank 0): the cache every rank
        # maps (shared_kv_cache), or rank 0's transfer staging region, its own block ids
        # (allocate_whole_kv_cache)
        self.whole_kv_cache: torch.Tensor | None = None
        control_wait = timedelta(seconds=timeout_s) if rank == 0 else _FOLLOWER_WAIT
        self.control = _gloo_group(store, "control", rank, world_size, control_wait)
        on_nccl = device.type == "cuda" and not compute_on_gloo
        self.compute = _compute_group(store, rank, world_size, on_nccl, timeout_s)

    # ---- collectives of the forward (compute group) -----------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks, in place; returns `x`."""
        self.compute.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, cols] on each rank -> [rows, world_size * cols], rank 0's columns first."""
        gathered = x.new_empty((self.world_size * x.shape[0], x.shape[1]))
        self.compute._allgather_base(gathered, x.contiguous()).wait()
        return gathered.view(self.world_size, *x.shape).transpose(0, 1).reshape(x.shape[0], -1)

    def embed(self, weight: torch.Tensor, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """Vocab-parallel lookup: `weight` [rows, hidden] holds ids [start, start + rows); each
        rank fills the tokens it holds, zeros elsewhere; the sum is every token's embedding."""
        local = input_ids - start
        outside = (local < 0) | (local >= weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), weight)  # [num_tokens, hidden]
        return self.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))

    # ---- the KV cache every rank shares (CPU) ------------------------------------------

    def shared_kv_cache(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """This rank's KV cache (`shape`, its KV heads in dim 4) as a view of one cache that
        holds every rank's heads side by side, in memory all ranks map (a file under
        KV_SHARE_DIR, unlinked once mapped). Rank 0 keeps the whole in `whole_kv_cache`: KV
        transfer reads and writes every rank's heads through it. Collective (start-up)."""
        assert device.type == "cpu", "a shared KV cache is CPU memory"
        whole_shape = (*shape[:4], self.world_size * shape[4], *shape[5:])
        nbytes = math.prod(whole_shape) * torch.empty((), dtype=dtype).element_size()
        if self.rank == 0:
            try:
                self.whole_kv_cache = whole = self._share(nbytes, dtype, whole_shape)
            except BaseException:
                if self.followers is not None:  # they wait for the file: none will come
                    self.followers.kill()
                raise
        else:
            whole = _map(self.store.get("kv-cache").decode(), nbytes, dtype, whole_shape)
            self.store.set(f"kv-mapped/{self.rank}", "1")
        return whole.narrow(4, self.rank * shape[4], shape[4])

    def _share(self, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Rank 0: the whole cache, mapped by every rank once this returns."""
        path = _new_share_file(nbytes)
        try:
            whole = _map(path, nbytes, dtype, shape)
            self.store.set("kv-cache", path)
            if self.followers is not None:
                self.followers.wait_for(self.store, "kv-mapped")
        finally:
            os.unlink(path)  # the mappings stay; nothing is left behind on disk
        return whole

    # ---- control (rank 0 drives) -------------------------------------------------------

    def agree_min(self, value: int) -> int:
        """The smallest `value` over the ranks, once every rank is ready (start-up)."""
        self._wait_until_ready()
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN  # type: ignore[assignment]  # stubs: RedOpType
        tensor = torch.tensor([value], dtype=torch.long)
        self._control(lambda: self.control.allreduce([tensor], options).wait())
        return int(tensor.item())

    def send_plan(self, plan: list[int]) -> None:
        """Rank 0: broadcast one step's plan (encode_plan). Raises RankFailed."""
        self._send(_PLAN_STEP, plan)

    def receive_plan(self) -> tuple[int, list[int]] | None:
        """Followers: the next plan's kind (PLAN_STEP, PLAN_GATHER_KV, PLAN_SCATTER_KV) and
        payload, or None when rank 0 stops the engine."""
        header = torch.zeros(2, dtype=torch.long)
        self.control.broadcast(header, 0).wait()
        kind, length = int(header[0]), int(header[1])
        if kind == _PLAN_STOP:
            return None
        payload = torch.empty(length, dtype=torch.long)
        if length:
            self.control.broadcast(payload, 0).wait()
        return kind, payload.tolist()

    # ---- KV moved for a transfer (private caches: engine.Engine, "private KV") -----------

    def allocate_whole_kv_cache(
        self, local: torch.Tensor, num_kv_heads: int, num_blocks: int
    ) -> None:
        """Rank 0 of ranks with private caches: the transfer staging region
        (`whole_kv_cache`), `num_blocks` blocks shaped like this rank's `local` ones but with
        room for all `num_kv_heads`, for KV transfer alone: a staging block holds KV only
        between a gather_kv and its shipping, or between a transfer's landing and its
        scatter_kv (engine.transfer_region maps engine blocks to staging ones). Pages cost
        memory once written on the CPU (zeros_on_demand)."""
        from engine.model_runner import zeros_on_demand

        shape = (*local.shape[:2], num_blocks, *local.shape[3:4], num_kv_heads, *local.shape[5:])
        self.whole_kv_cache = zeros_on_demand(shape, local.dtype, local.device)

    def gather_kv(
        self,
        local: torch.Tensor,
        block_ids: list[int],
        kv_heads: list[tuple[int, int]],
        whole_ids: list[int] | None = None,
    ) -> None:
        """Every rank: copy the blocks `block_ids` of every rank's cache `local` into rank 0's
        `whole_kv_cache` at `whole_ids` (rank 0's staging ids, one per block; followers pass
        None), each rank's KV heads (`kv_heads[rank]`: first head, count) in their place; one
        gather per chunk of layers. Rank 0 first sends PLAN_GATHER_KV (request_kv). Raises
        RankFailed on rank 0 if a rank fails."""
        self._move_kv(local, block_ids, kv_heads, gather=True, whole_ids=whole_ids)

    def scatter_kv(
        self,
        local: torch.Tensor,
        block_ids: list[int],
        kv_heads: list[tuple[int, int]],
        whole_ids: list[int] | None = None,
    ) -> None:
        """The reverse of gather_kv: each rank's cache gets its KV heads of blocks `block_ids`
        from rank 0's `whole_kv_cache` at `whole_ids`."""
        self._move_kv(local, block_ids, kv_heads, gather=False, whole_ids=whole_ids)

    def request_kv(self, block_ids: list[int], gather: bool) -> None:
        """Rank 0: tell the followers to join a gather_kv (or scatter_kv) of `block_ids`."""
        self._send(_PLAN_GATHER_KV if gather else _PLAN_SCATTER_KV, block_ids)

    def _move_kv(
        self,
        local: torch.Tensor,
        block_ids: list[int],
        kv_heads: list[tuple[int, int]],
        gather: bool,
        whole_ids: list[int] | None,
    ) -> None:
        ids = torch.tensor(block_ids, dtype=torch.long, device=local.device)
        staged = ids
        if self.rank == 0:
            assert whole_ids is not None and len(whole_ids) == len(block_ids), "staging ids"
            staged = torch.tensor(whole_ids, dtype=torch.long, device=local.device)
        layer_bytes = 2 * len(block_ids) * math.prod(local.shape[3:]) * local.element_size()
        per_chunk = max(1, KV_MOVE_CHUNK_BYTES // max(layer_bytes, 1))
        for start in range(0, local.shape[0], per_chunk):
            layers = slice(start, min(start + per_chunk, local.shape[0]))
            if gather:
                self._gather_chunk(local, layers, ids, staged, kv_heads)
            else:
                self._scatter_chunk(local, layers, ids, staged, kv_heads)
        if self.rank == 0 and local.is_cuda:  # KV transfer reads (writes) on its own stream
            torch.cuda.current_stream(local.device).synchronize()

    def _gather_chunk(
        self,
        local: torch.Tensor,
        layers: slice,
        ids: torch.Tensor,
        staged: torch.Tensor,
        kv_heads: list[tuple[int, int]],
    ) -> None:
        rows = _head_rows(local[layers].index_select(2, ids))
        pieces = [torch.empty_like(rows) for _ in kv_heads] if self.rank == 0 else []
        to_root = dist.GatherOptions()
        to_root.rootRank = 0
        outputs = [[_bytes(p) for p in pieces]] if pieces else []
        self._compute(self.compute.gather, outputs, [_bytes(rows)], to_root)
        if self.rank != 0:
            return
        whole = self._whole()
        assembled = rows.new_empty((*rows.shape[:4], whole.shape[4], rows.shape[5]))
        for rank in _first_holders(kv_heads):
            first, count = kv_heads[rank]
            assembled[:, :, :, :, first : first + count] = pieces[rank]
        whole[layers, :, staged] = _packed_blocks(assembled, whole)

    def _scatter_chunk(
        self,
        local: torch.Tensor,
        layers: slice,
        ids: torch.Tensor,
        staged: torch.Tensor,
        kv_heads: list[tuple[int, int]],
    ) -> None:
        shape = (layers.stop - layers.start, 2, len(ids), *local.shape[3:])
        rows = torch.empty(shape, dtype=local.dtype, device=local.device)
        inputs = []
        if self.rank == 0:
            whole = _head_rows(self._whole()[layers].index_select(2, staged))
            parts = [whole[:, :, :, :, f : f + n].contiguous() for f, n in kv_heads]
            inputs = [[_bytes(p) for p in parts]]
        from_root = dist.ScatterOptions()
        from_root.rootRank = 0
        self._compute(self.compute.scatter, [_bytes(rows)], inputs, from_root)
        local[layers, :, ids] = _packed_blocks(rows, local)

    def _whole(self) -> torch.Tensor:
        assert self.whole_kv_cache is not None, "rank 0 of private caches holds a whole one"
        return self.whole_kv_cache

    def _compute(self, collective: Callable[..., Any], *args: Any) -> None:
        """A collective of the compute group outside the forward; failures as _control's."""
        if self.failure is not None:
            raise self.failure
        try:
            collective(*args).wait()
        except RuntimeError as e:  # gloo / NCCL: a peer closed its connection, or the timeout
            if self.rank != 0:
                raise
            raise self.fail(e) from e

    def stop(self) -> None:
        """Rank 0: tell the followers to exit, wait for them (killing any that linger).
        Idempotent; after a failure it only makes sure they are gone."""
        if self.followers is None:
            return
        if self.failure is None:
            try:
                self._send(_PLAN_STOP, [])
            except RankFailed as e:
                logger.warning("tensor-parallel ranks did not all stop cleanly: %s", e)
        self.followers.join(self.timeout_s)
        self.followers = None

    def fail(self, cause: BaseException) -> RankFailed:
        """Rank 0, after a collective raised: the RankFailed that names the dead ranks (or the
        timeout); kills the ranks still alive. Later calls raise the same error."""
        if self.failure is None:
            dead = self.followers.dead_ranks(_EXIT_WAIT_S) if self.followers else []
            what = "; ".join(dead) if dead else f"a collective failed or timed out: {cause}"
            self.failure = RankFailed(f"tensor-parallel rank failed ({what})")
            logger.error("%s; stopping the other ranks", self.failure)
            if self.followers is not None:
                self.followers.kill()
        return self.failure

    def _send(self, kind: int, plan: list[int]) -> None:
        if self.failure is not None:
            raise self.failure
        header = torch.tensor([kind, len(plan)], dtype=torch.long)
        self._control(lambda: self.control.broadcast(header, 0).wait())
        if plan:
            payload = torch.tensor(plan, dtype=torch.long)
            self._control(lambda: self.control.broadcast(payload, 0).wait())

    def _control(self, call: Callable[[], object]) -> None:
        if self.failure is not None:
            raise self.failure
        try:
            call()
        except RuntimeError as e:  # gloo: a peer closed its connection, or the timeout
            if self.rank != 0:
                raise
            raise self.fail(e) from e

    def _wait_until_ready(self) -> None:
        """Followers announce they are ready; rank 0 waits for all of them."""
        if self.rank != 0:
            self.store.set(f"ready/{self.rank}", "1")
        elif self.followers is not None:
            try:
                self.followers.wait_for(self.store, "ready")
            except RankFailed as e:
                self.failure = e
                raise


@dataclass
class Followers:
    """Rank 0's handle on the processes of ranks 1..N-1."""

    processes: list[subprocess.Popen[bytes]]

    def dead_ranks(self, wait_s: float) -> list[str]:
        """'rank r (pid p) exited with code c' for every follower that has exited, waiting up
        to `wait_s` for one to (a rank whose connection just closed is usually exiting)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [
                f"rank {rank} (pid {p.pid}) exited with code {p.returncode}"
                for rank, p in enumerate(self.processes, start=1)
                if p.poll() is not None
            ]
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.05)

    def wait_for(self, store: dist.Store, stage: str) -> None:
        """Wait until every follower has set `<stage>/<rank>` in the store. Raises RankFailed
        (killing the followers) as soon as one exits, or after STARTUP_TIMEOUT_S."""
        keys = [f"{stage}/{rank}" for rank in range(1, len(self.processes) + 1)]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not store.check(keys):
            dead = self.dead_ranks(0.0)
            if dead or time.monotonic() > deadline:
                self.kill()
                reason = "; ".join(dead) or f"not {stage} within {STARTUP_TIMEOUT_S:.0f} s"
                raise RankFailed(f"tensor-parallel start-up failed ({reason})")
            time.sleep(0.05)  # processes that import torch and load a model: seconds

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for p in self.processes:
            try:
                p.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                logger.warning("tensor-parallel rank (pid %d) did not exit; killing it", p.pid)
        self.kill()

    def kill(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait()


def start_ranks(config: EngineConfig, device: torch.device) -> TensorParallelGroup:
    """Rank 0: start ranks 1..N-1 as processes on this host (`python -m engine.parallel`: no
    re-import of the caller's main module) and connect to them. Raises RankFailed if one
    exits or they do not connect in time."""
    world = config.tensor_parallel_size
    wait = timedelta(seconds=STARTUP_TIMEOUT_S)
    store = dist.TCPStore(HOST, 0, world, True, timeout=wait, wait_for_workers=False)
    followers = Followers([_spawn(config, rank, store.port) for rank in range(1, world)])
    atexit.register(followers.kill)  # never outlive this process's interpreter
    followers.wait_for(store, "started")  # then their groups connect within the timeout
    try:
        timeout_s, on_gloo = config.tensor_parallel_timeout_s, config.tensor_parallel_one_device
        return TensorParallelGroup(0, world, store, device, timeout_s, followers, on_gloo)
    except RuntimeError as e:
        dead = followers.dead_ranks(_EXIT_WAIT_S)
        followers.kill()
        raise RankFailed(f"tensor-parallel ranks did not connect ({'; '.join(dead) or e})") from e


def _new_share_file(nbytes: int) -> str:
    """A new file of `nbytes` (sparse: pages cost memory once written) under KV_SHARE_DIR."""
    folder = os.environ.get(_SHARE_DIR_ENV, KV_SHARE_DIR)
    if not os.path.isdir(folder):
        folder = tempfile.gettempdir()
    free_bytes = shutil.disk_usage(folder).free
    if free_bytes < nbytes:
        raise RankFailed(
            f"the shared KV cache needs {nbytes} bytes; {folder} has {free_bytes} free "
            f"(set {_SHARE_DIR_ENV} or fewer num_kv_blocks)"
        )
    descriptor, path = tempfile.mkstemp(prefix="tandem-kv-", dir=folder)
    try:
        os.ftruncate(descriptor, nbytes)
    finally:
        os.close(descriptor)
    return path


def _map(path: str, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    flat = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    return flat.view(dtype).view(shape)


def _spawn(config: EngineConfig, rank: int, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])  # where `engine` is importable from
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env[_LOG_LEVEL_ENV] = str(logging.getLogger().getEffectiveLevel())  # rank 0's verbosity
    command = [sys.executable, "-m", "engine.parallel", str(rank), str(port), _config_json(config)]
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)


def _config_json(config: EngineConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def _config_from_json(text: str) -> EngineConfig:
    from engine.config import EngineConfig
    from engine.scheduler import SchedulerConfig

    fields = json.loads(text)
    if fields["scheduler"] is not None:
        fields["scheduler"] = SchedulerConfig(**fields["scheduler"])
    return EngineConfig(**fields)


def follower_main(config: EngineConfig, rank: int, port: int) -> None:
    """Rank `rank` (a process start_ranks started): build this rank's engine and run every
    plan rank 0 sends until it says stop. Any failure ends the process (non-zero exit)."""
    from engine.engine import Engine

    world = config.tensor_parallel_size
    device = torch.device("cpu")
    if torch.cuda.is_available() and config.device != "cpu":
        # one GPU per rank; all on rank 0's first GPU with tensor_parallel_one_device (tests)
        device = torch.device("cuda", 0 if config.tensor_parallel_one_device else rank)
        torch.cuda.set_device(device)
    else:  # CPU ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    store = dist.TCPStore(HOST, port, world, False, timeout=timedelta(seconds=STARTUP_TIMEOUT_S))
    store.set(f"started/{rank}", "1")
    timeout_s, on_gloo = config.tensor_parallel_timeout_s, config.tensor_parallel_one_device
    group = TensorParallelGroup(rank, world, store, device, timeout_s, compute_on_gloo=on_gloo)
    engine = Engine(config, tp_group=group)
    while (received := group.receive_plan()) is not None:
        kind, payload = received
        if kind == _PLAN_STEP:
            engine.runner.execute(decode_plan(payload))
        else:  # a KV transfer's blocks, to or from rank 0 (private caches)
            move = group.gather_kv if kind == _PLAN_GATHER_KV else group.scatter_kv
            move(engine.runner.kv_cache, payload, engine.rank_kv_heads())
    logger.info("rank %d stopped", rank)


def _first_holders(kv_heads: list[tuple[int, int]]) -> list[int]:
    """The ranks whose KV heads no lower rank holds (KV heads replicated: the first of each)."""
    return [r for r, heads in enumerate(kv_heads) if heads not in kv_heads[:r]]


def _head_rows(blocks: torch.Tensor) -> torch.Tensor:
    """Contiguous cache blocks [..., block_size, kv_heads, row] with each (token, head)'s KV
    in its own row, so that a range of heads is a slice: the blocks themselves, or for a
    packed FP8 cache (engine.kv_quant: a block's values, then its scales) each row's values
    followed by its scale's 4 bytes."""
    from engine.kv_quant import SCALE_BYTES, is_fp8_cache, split_fp8_cache

    if not is_fp8_cache(blocks):
        return blocks
    values, scales = split_fp8_cache(blocks)
    scale_bytes = scales.unsqueeze(-1).view(torch.uint8)
    assert scale_bytes.shape[-1] == SCALE_BYTES
    return torch.cat([values.view(torch.uint8), scale_bytes], dim=-1)


def _packed_blocks(rows: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """The inverse of _head_rows: blocks as `cache` stores them."""
    from engine.kv_quant import SCALE_BYTES, is_fp8_cache, split_fp8_cache

    if not is_fp8_cache(cache):
        return rows
    packed = torch.empty_like(rows)
    values, scales = split_fp8_cache(packed)
    values.view(torch.uint8).copy_(rows[..., :-SCALE_BYTES])
    scales.copy_(rows[..., -SCALE_BYTES:].contiguous().view(torch.float32).squeeze(-1))
    return packed


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as uint8 (gloo and NCCL move FP8 KV as bytes)."""
    return tensor.reshape(-1).view(torch.uint8)


# ---- the step plan -----------------------------------------------------------------------
#
#   [num_items, then per scheduled sequence, in SchedulerOutput.scheduled order:
#    num_new_tokens, num_computed_tokens, samples_token (0/1), num_blocks, *block_ids,
#    *token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]]
#
# Everything ModelRunner.execute reads of a sequence, so every rank builds the same tensors.


def encode_plan(output: SchedulerOutput) -> list[int]:
    plan = [len(output.scheduled)]
    for item in output.scheduled:
        seq, start = item.seq, item.seq.num_computed_tokens
        plan += (item.num_new_tokens, start, int(item.samples_token), len(seq.block_ids))
        plan += seq.block_ids
        plan += seq.token_ids[start : start + item.num_new_tokens]
    return plan


def decode_plan(plan: list[int]) -> SchedulerOutput:
    """The SchedulerOutput rank 0 ran, as far as the model runner can tell."""
    scheduled, at = [], 1
    for _ in range(plan[0]):
        num_new, start, samples, num_blocks = plan[at : at + 4]
        at += 4
        block_ids = plan[at : at + num_blocks]
        at += num_blocks
        tokens = _TokenWindow(start, plan[at : at + num_new])
        at += num_new
        seq = _PlannedSequence(tokens, start, block_ids, start + num_new + (0 if samples else 1))
        scheduled.append(ScheduledSequence(cast(Sequence, seq), num_new))
    assert at == len(plan), f"plan of {len(plan)} values has {at} in its items"
    return SchedulerOutput(scheduled, [])


class _TokenWindow:
    """The token ids of positions [start, start + len(ids)), indexed by position."""

    def __init__(self, start: int, ids: list[int]) -> None:
        self.start, self.ids = start, ids

    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            return self.ids[index.start - self.start : index.stop - self.start]
        return self.ids[index - self.start]


@dataclass(slots=True)
class _PlannedSequence:
    """What a follower knows of a sequence: the fields ModelRunner reads (duck-typed)."""

    token_ids: _TokenWindow
    num_computed_tokens: int
    block_ids: list[int]
    num_tokens: int  # makes samples_token what rank 0 computed


# ---- process groups ----------------------------------------------------------------------


def _gloo_group(
    store: dist.Store, name: str, rank: int, world_size: int, timeout: timedelta
) -> Backend:
    from torch.distributed import ProcessGroupGloo

    options = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._timeout = timeout
    options._devices = [ProcessGroupGloo.create_device(hostname=HOST)]
    return ProcessGroupGloo(dist.PrefixStore(name, store), rank, world_size, options)


def _compute_group(
    store: dist.Store, rank: int, world_size: int, on_nccl: bool, timeout_s: float
) -> Backend:
    timeout = timedelta(seconds=timeout_s)
    if not on_nccl:
        return _gloo_group(store, "compute", rank, world_size, timeout)
    from torch.distributed import ProcessGroupNCCL

    options = ProcessGroupNCCL.Options()
    options._timeout = timeout
    return ProcessGroupNCCL(dist.PrefixStore("compute", store), rank, world_size, options)


if __name__ == "__main__":  # python -m engine.parallel RANK PORT CONFIG_JSON (start_ranks)
    _rank = int(sys.argv[1])
    _level = int(os.environ.get(_LOG_LEVEL_ENV, logging.WARNING))
    logging.basicConfig(level=_level, format=f"%(asctime)s tp-rank-{_rank} %(message)s")
    try:
        follower_main(_config_from_json(sys.argv[3]), _rank, int(sys.argv[2]))
    except RuntimeError as _error:  # a collective failed: rank 0 or another rank is gone
        logger.error("tensor-parallel rank %d stops: %s", _rank, _error)
        sys.exit(1)

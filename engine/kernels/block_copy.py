"""Gather and scatter of whole KV blocks on a bounded number of persistent programs, so a pipelined
KV transfer's copies leave SMs to NCCL's kernel for the neighbouring part (torch's index ops fill
every SM). Memory as rows of 8-byte words (int64 views, as kvtransfer.coalesce prepares):

    cache [rows, num_cache_blocks, words]   staging [rows, num_ids, words]   rows = layers x 2
    gather: staging[r, i] = cache[r, ids[i]]      scatter: cache[r, ids[i]] = staging[r, i]

`copy_blocks_ref` is the torch reference. Runs on the caller's CUDA stream; on CPU only under
TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.launch import check_devices, on_device

_TILE_WORDS = 1024  # 8 KiB per load/store step of one program (4 warps x 32 x 8 words)


@triton.jit(do_not_specialize=["num_ids", "num_rows", "src_row_blocks", "dst_row_blocks"])
def _block_copy_kernel(
    src_ptr,  # int64 words
    dst_ptr,  # int64 words
    ids_ptr,  # [num_ids] int64 block ids in the cache
    num_ids,
    num_rows,  # (layer, K/V) rows
    src_row_blocks,  # blocks per row of the source (cache: num_cache_blocks; staging: num_ids)
    dst_row_blocks,
    WORDS: tl.constexpr,  # words per block (a model constant)
    GATHER: tl.constexpr,  # True: cache -> staging; False: staging -> cache
    TILE: tl.constexpr,
):
    offs = tl.arange(0, TILE)
    for item in range(tl.program_id(0), num_rows * num_ids, tl.num_programs(0)):
        row = item // num_ids
        i = item % num_ids
        block = tl.load(ids_ptr + i)
        if GATHER:
            src_block = row.to(tl.int64) * src_row_blocks + block
            dst_block = row.to(tl.int64) * dst_row_blocks + i
        else:
            src_block = row.to(tl.int64) * src_row_blocks + i
            dst_block = row.to(tl.int64) * dst_row_blocks + block
        src = src_ptr + src_block * WORDS
        dst = dst_ptr + dst_block * WORDS
        for start in range(0, WORDS, TILE):
            mask = start + offs < WORDS
            tl.store(dst + start + offs, tl.load(src + start + offs, mask=mask), mask=mask)


def copy_blocks(
    cache: torch.Tensor,  # [rows, num_cache_blocks, words] int64, contiguous
    staging: torch.Tensor,  # [rows, num_ids, words] int64, contiguous
    ids: torch.Tensor,  # [num_ids] int64 on the same device, in [0, num_cache_blocks)
    *,
    gather: bool,
    num_programs: int,
) -> None:
    """gather: staging[r, i] = cache[r, ids[i]]; else cache[r, ids[i]] = staging[r, i]. With
    `num_programs` persistent programs. Ids are not range-checked here (that would sync): the
    caller checks them on the host (kvtransfer.coalesce.block_index). Raises ValueError for
    tensors of the wrong dtype, layout, shape or device, or num_programs < 1."""
    for name, tensor in (("cache", cache), ("staging", staging), ("ids", ids)):
        if tensor.dtype != torch.int64:
            raise ValueError(f"{name} must be int64 (words), got {tensor.dtype}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if cache.dim() != 3 or staging.dim() != 3 or ids.dim() != 1:
        raise ValueError(
            f"want cache [rows, blocks, words], staging [rows, ids, words], ids [ids]; got "
            f"{tuple(cache.shape)}, {tuple(staging.shape)}, {tuple(ids.shape)}"
        )
    rows, num_cache_blocks, words = cache.shape
    if tuple(staging.shape) != (rows, ids.numel(), words):
        raise ValueError(
            f"staging shape {tuple(staging.shape)} != {(rows, ids.numel(), words)} for a cache "
            f"of {tuple(cache.shape)} and {ids.numel()} ids"
        )
    if type(num_programs) is not int or num_programs < 1:
        raise ValueError(f"num_programs={num_programs!r} must be a positive int")
    check_devices(cache, staging, ids)
    num_ids = ids.numel()
    if num_ids == 0 or rows == 0 or words == 0:
        return
    src, dst = (cache, staging) if gather else (staging, cache)
    src_row_blocks, dst_row_blocks = (
        (num_cache_blocks, num_ids) if gather else (num_ids, num_cache_blocks)
    )
    grid = (min(num_programs, rows * num_ids),)
    with on_device(cache.device):
        _block_copy_kernel[grid](
            src, dst, ids, num_ids, rows, src_row_blocks, dst_row_blocks,
            WORDS=words, GATHER=gather, TILE=min(_TILE_WORDS, triton.next_power_of_2(words)),
            num_warps=4,
        )  # fmt: skip


def copy_blocks_ref(
    cache: torch.Tensor,  # [rows, num_cache_blocks, words]
    staging: torch.Tensor,  # [rows, num_ids, words]
    ids: torch.Tensor,  # [num_ids] int64, in [0, num_cache_blocks)
    *,
    gather: bool,
) -> None:
    """Plain torch reference of `copy_blocks`, in place: gather writes `staging`, scatter
    writes `cache` (ids distinct for a scatter)."""
    if gather:
        staging.copy_(cache.index_select(1, ids))
    else:
        cache.index_copy_(1, ids, staging)

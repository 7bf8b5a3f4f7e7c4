"""The paged decode attention kernel matches `paged_decode_attention_ref`.

The reference runs on fp32 copies of the inputs. On CPU the kernel runs under
TRITON_INTERPRET=1 in fp32: atol = rtol = 1e-4 (summation order and exp2 vs exp differ). On
CUDA it runs in bf16 (atol = rtol = 2e-2) and fp16 (5e-3): the kernel rounds the softmax
weights to the cache dtype before multiplying V, as flash attention does. Different split
counts of the same input agree to 1e-5 in fp32 (only the merge order differs).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from engine.kernels import decode_attention
from engine.kernels.decode_attention import (
    DecodeAttentionWorkspace,
    choose_num_splits,
    paged_decode_attention,
    paged_decode_attention_ref,
)

pytestmark = pytest.mark.slow

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32]
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@dataclass(frozen=True)
class Case:
    q: torch.Tensor  # [num_seqs, num_heads, head_dim]
    kv_cache_layer: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor  # [num_seqs, max_blocks]
    context_lens: torch.Tensor  # [num_seqs]
    scale: float

    @property
    def args(self) -> tuple:
        k_cache, v_cache = self.kv_cache_layer[0], self.kv_cache_layer[1]
        return (self.q, k_cache, v_cache, self.block_tables, self.context_lens, self.scale)

    def reference(self) -> torch.Tensor:  # [num_seqs, num_heads, head_dim] fp32
        q, k_cache, v_cache, tables, lens, scale = self.args
        k_cache, v_cache = k_cache.float(), v_cache.float()
        return paged_decode_attention_ref(q.float(), k_cache, v_cache, tables, lens, scale)


def make_case(
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    *,
    seed: int = 0,
    index_dtype: torch.dtype = torch.int32,
    q_std: float = 1.0,
) -> Case:
    """Random q and cache; each sequence owns shuffled, non-contiguous blocks; table columns
    past a sequence's blocks hold arbitrary valid block ids, as padded tables may."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs = len(context_lens)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    max_blocks = max(blocks_per_seq, default=0) + 1
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks that no sequence owns
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    tables = torch.randint(0, num_blocks, (num_seqs, max_blocks), generator=gen)
    free_ids = torch.randperm(num_blocks, generator=gen).tolist()
    for seq, n in enumerate(blocks_per_seq):
        tables[seq, :n] = torch.tensor([free_ids.pop() for _ in range(n)], dtype=torch.long)
    q = q_std * torch.randn(num_seqs, num_heads, head_dim, generator=gen)
    return Case(
        q=q.to(DEVICE, dtype),
        kv_cache_layer=kv.to(DEVICE, dtype),
        block_tables=tables.to(DEVICE, index_dtype),
        context_lens=torch.tensor(context_lens, dtype=index_dtype, device=DEVICE),
        scale=head_dim**-0.5,
    )


def check(case: Case, num_splits: int | None, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full_like(case.q, float("nan"))  # every element must be written
    result = paged_decode_attention(*case.args, out=out, num_splits=num_splits)
    assert result is out
    torch.testing.assert_close(out.float(), case.reference(), **TOLERANCES[dtype])
    return out


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group_size", [1, 3, 4, 8])
def test_gqa_group_sizes(group_size: int, head_dim: int) -> None:
    dtype = DTYPES[0]
    # 300 tokens span three 128-token tiles: with 3 splits, each split holds one of them.
    case = make_case([1, 17, 37, 300], 2 * group_size, 2, head_dim, 16, dtype, seed=group_size)
    check(case, num_splits=1, dtype=dtype)
    check(case, num_splits=3, dtype=dtype)


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_block_boundaries(block_size: int) -> None:
    dtype = DTYPES[0]
    lens = [1, block_size - 1, block_size, block_size + 1, 37, 260]
    case = make_case(lens, 4, 1, 64, block_size, dtype, seed=block_size)
    check(case, num_splits=1, dtype=dtype)
    check(case, num_splits=2, dtype=dtype)


def test_split_counts_agree() -> None:
    case = make_case([5, 70, 133], 4, 2, 64, 16, DTYPES[0], seed=3)
    one_split = check(case, num_splits=1, dtype=DTYPES[0])
    for num_splits in (2, 3, 9):  # 9 splits leave most splits of the short rows empty
        out = paged_decode_attention(*case.args, num_splits=num_splits)
        torch.testing.assert_close(out, one_split, atol=1e-5 if DEVICE == "cpu" else 2e-2, rtol=0)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_padding_rows_are_zero(num_splits: int) -> None:
    dtype = DTYPES[0]
    case = make_case([0, 21, 0, 3], 6, 2, 64, 8, dtype, seed=4)
    out = check(case, num_splits=num_splits, dtype=dtype)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize(("group_size", "head_dim"), [(1, 64), (3, 48)])
def test_amax_out_is_each_heads_max_of_what_is_stored(
    num_splits: int, group_size: int, head_dim: int
) -> None:
    """amax_out[seq, head] = max |out[seq, head]| as stored, written by the split kernel (one
    split) or the reduce kernel (several); padding rows write 0 (Fp8Pending's amaxes)."""
    dtype = DTYPES[0]
    case = make_case([0, 21, 300, 0, 3], 2 * group_size, 2, head_dim, 16, dtype, seed=6)
    amax = torch.full((5, 2 * group_size), float("nan"), device=DEVICE)  # every slot written
    out = paged_decode_attention(*case.args, num_splits=num_splits, amax_out=amax)
    torch.testing.assert_close(out.float(), case.reference(), **TOLERANCES[dtype])
    assert torch.equal(amax, out.float().abs().amax(dim=2))
    assert torch.equal(amax[0], torch.zeros_like(amax[0])) and not amax[1].eq(0).any()
    assert torch.equal(out, paged_decode_attention(*case.args, num_splits=num_splits))


def test_rejects_a_bad_amax_out() -> None:
    case = make_case([5, 9], 4, 2, 64, 16, DTYPES[0], seed=7)
    for amax in (
        torch.empty(2, 2, device=DEVICE),  # one per kv head: a head each is wanted
        torch.empty(2, 4, device=DEVICE, dtype=torch.float64),
        torch.empty(4, 2, device=DEVICE).t(),
    ):
        with pytest.raises(ValueError, match="amax_out must be"):
            paged_decode_attention(*case.args, amax_out=amax)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_all_rows_padding(num_splits: int) -> None:
    case = make_case([0, 0], 4, 4, 64, 16, DTYPES[0])
    out = paged_decode_attention(*case.args, num_splits=num_splits)
    assert torch.equal(out, torch.zeros_like(out))


def test_sharp_softmax_and_int64_indices() -> None:
    # q_std 8 makes scores span hundreds: the running max must rescale without overflow.
    dtype = DTYPES[0]
    case = make_case([40, 9], 4, 1, 128, 16, dtype, seed=5, index_dtype=torch.int64, q_std=8.0)
    out = check(case, num_splits=2, dtype=dtype)
    assert torch.isfinite(out).all()


def test_strided_q_out_and_reused_workspace() -> None:
    dtype = DTYPES[0]
    case = make_case([30, 3, 12], 6, 2, 64, 16, dtype, seed=6)
    num_seqs, num_heads, head_dim = case.q.shape
    # q as a slice of a fused qkv projection; out as a slice of a wider buffer.
    qkv = torch.randn(num_seqs, num_heads + 4, head_dim, device=DEVICE).to(dtype)
    qkv[:, :num_heads] = case.q
    q = qkv[:, :num_heads]
    wide_out = torch.zeros(num_seqs, num_heads + 2, head_dim, device=DEVICE, dtype=dtype)
    workspace = DecodeAttentionWorkspace.allocate(8, num_heads, 4, head_dim, DEVICE)
    _, k_cache, v_cache, tables, lens, scale = case.args

    for _ in range(2):
        paged_decode_attention(
            q, k_cache, v_cache, tables, lens, scale,
            out=wide_out[:, 2:], num_splits=3, workspace=workspace,
        )  # fmt: skip
        torch.testing.assert_close(wide_out[:, 2:].float(), case.reference(), **TOLERANCES[dtype])
    assert torch.count_nonzero(wide_out[:, :2]) == 0, "wrote outside out"


def test_auto_split_count_is_used() -> None:
    # One long sequence, one kv head: choose_num_splits asks for several splits.
    case = make_case([300], 3, 1, 64, 16, DTYPES[0], seed=7)
    max_blocks = case.block_tables.shape[1]
    assert choose_num_splits(1, 1, max_blocks, 16, case.q.device) > 1
    check(case, num_splits=None, dtype=DTYPES[0])


def test_choose_num_splits_bounds() -> None:
    device = torch.device(DEVICE)
    assert choose_num_splits(256, 8, 4096, 16, device) == 1  # enough programs already
    assert choose_num_splits(1, 8, 1, 16, device) == 1  # context too short to split
    many = choose_num_splits(1, 1, 100_000, 16, device)
    assert 1 < many <= 32
    assert choose_num_splits(0, 8, 0, 16, device) == 1


def test_zero_seqs() -> None:
    case = make_case([], 4, 2, 64, 16, DTYPES[0])
    assert paged_decode_attention(*case.args).shape == (0, 4, 64)


@pytest.mark.parametrize(
    "case_name", ["q_rank", "heads", "head_dim", "dtype", "table_dtype", "lens_shape", "out"]
)
def test_rejects_bad_inputs(case_name: str) -> None:
    q, k_cache, v_cache, tables, lens, scale = make_case([3, 5], 4, 2, 64, 16, DTYPES[0]).args
    out = None
    if case_name == "q_rank":
        q = q[0]
    elif case_name == "heads":
        q = torch.cat([q, q[:, :1]], dim=1)  # 5 heads over 2 kv heads
    elif case_name == "head_dim":
        q = q[..., :32]
    elif case_name == "dtype":
        q = q.double()
    elif case_name == "table_dtype":
        tables = tables.float()
    elif case_name == "lens_shape":
        lens = lens[:1]
    elif case_name == "out":
        out = torch.empty(2, 4, 32, device=DEVICE, dtype=q.dtype)
    with pytest.raises(ValueError):
        paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, out=out)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_llama_shapes_on_gpu(dtype: torch.dtype, block_size: int) -> None:
    gen = torch.Generator().manual_seed(11)
    random_lens = torch.randint(1, 3000, (9,), generator=gen).tolist()
    lens = [1, 15, 16, 17, 640, 0, 4097, 2049, *random_lens]
    case = make_case(lens, 32, 8, 128, block_size, dtype, seed=12)
    for num_splits in (None, 1, 7):
        check(case, num_splits=num_splits, dtype=dtype)


@needs_cuda
@pytest.mark.gpu
def test_no_host_sync_and_cuda_graph_replay() -> None:
    dtype = torch.bfloat16
    case = make_case([100, 2000, 37, 512], 32, 8, 128, 16, dtype, seed=13)
    q, k_cache, v_cache, tables, lens, scale = case.args
    out = torch.empty_like(q)
    workspace = DecodeAttentionWorkspace.allocate(4, 32, 8, 128, DEVICE)
    run = lambda: paged_decode_attention(  # noqa: E731
        q, k_cache, v_cache, tables, lens, scale, out=out, num_splits=8, workspace=workspace
    )
    run()  # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    # Longer and shorter contexts than at capture (2010 still fits the 126-column tables).
    new_lens = torch.tensor([2010, 0, 1, 37], dtype=lens.dtype, device=DEVICE)
    lens.copy_(new_lens)
    new_tables = case.block_tables.flip(0)
    tables.copy_(new_tables)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    expected = Case(q, case.kv_cache_layer, tables, lens, scale).reference()
    torch.testing.assert_close(out.float(), expected, **TOLERANCES[dtype])


@pytest.fixture
def fused_reduce(monkeypatch: pytest.MonkeyPatch) -> None:
    """decode_attention.FUSED_REDUCE on for the test (the two-launch path is its reference)."""
    monkeypatch.setattr(decode_attention, "FUSED_REDUCE", True)


def both_paths(
    case: Case, num_splits: int, workspace: DecodeAttentionWorkspace, with_amax: bool
) -> tuple[tuple[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]:
    """(out, amax_out) of the two-launch path, then of the fused one, through one workspace."""
    results = []
    for fused in (False, True):
        decode_attention.FUSED_REDUCE = fused
        num_seqs, num_heads, _ = case.q.shape
        out = torch.full_like(case.q, float("nan"))  # every element must be written
        amax = torch.full((num_seqs, num_heads), float("nan"), device=case.q.device)
        amax_out = amax if with_amax else None
        paged_decode_attention(
            *case.args, out=out, num_splits=num_splits, workspace=workspace, amax_out=amax_out
        )
        results.append((out, amax_out))
    return results[0], results[1]


@pytest.mark.usefixtures("fused_reduce")
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(2, 2), (6, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_fused_reduce_is_bitwise_the_two_launch_path(
    num_splits: int, num_heads: int, num_kv_heads: int
) -> None:
    """The last split program's merge: the same outputs and amaxes, bit for bit, padding rows
    (context 0) and contexts shorter than one split (most splits empty) included; every ticket
    counter back at zero after each call; a second call through the same workspace agrees."""
    dtype = DTYPES[0]
    lens = [0, 5, 300, 0, 129, 700]  # 700 / 5 splits: 140 -> 256-token splits, 3 empty
    case = make_case(lens, num_heads, num_kv_heads, 64, 16, dtype, seed=num_splits + num_heads)
    workspace = DecodeAttentionWorkspace.allocate(8, num_heads, 8, 64, DEVICE, num_kv_heads)
    first = None
    for with_amax in (True, False, True):
        (out, amax), (fused_out, fused_amax) = both_paths(case, num_splits, workspace, with_amax)
        assert torch.equal(fused_out, out)
        assert torch.count_nonzero(workspace.counters) == 0
        if with_amax:
            assert amax is not None and fused_amax is not None
            assert torch.equal(fused_amax, amax) and torch.equal(amax[0], torch.zeros_like(amax[0]))
            if first is not None:  # the same workspace, a later call: the same result
                assert torch.equal(fused_out, first[0]) and torch.equal(fused_amax, first[1])
            first = (fused_out, fused_amax)
    torch.testing.assert_close(first[0].float(), case.reference(), **TOLERANCES[dtype])


@pytest.mark.usefixtures("fused_reduce")
def test_fused_reduce_one_split_and_own_workspace() -> None:
    """One split: the split kernel writes out as before (no counters). No workspace given: the
    launcher's own, counters zeroed. The ticket alone decides which program merges. Too few
    counters: refused."""
    dtype = DTYPES[0]
    case = make_case([0, 40, 300], 8, 2, 64, 16, dtype, seed=21)
    one_split = check(case, num_splits=1, dtype=dtype)
    check(case, num_splits=4, dtype=dtype)
    decode_attention.FUSED_REDUCE = False
    two_launch = paged_decode_attention(*case.args, num_splits=4)
    decode_attention.FUSED_REDUCE = True
    assert torch.equal(paged_decode_attention(*case.args, num_splits=4), two_launch)
    assert torch.equal(paged_decode_attention(*case.args, num_splits=1), one_split)
    # The ticket decides who merges: a group whose counter starts at -9 never draws ticket
    # 3 of 4, so its heads are not written (and its counter ends at -5); the others are.
    workspace = DecodeAttentionWorkspace.allocate(3, 8, 4, 64, DEVICE, num_kv_heads=2)
    workspace.counters[1, 0] = -9
    out = torch.full_like(case.q, float("nan"))
    paged_decode_attention(*case.args, out=out, num_splits=4, workspace=workspace)
    assert out[1, :4].isnan().all() and torch.equal(out[1, 4:], two_launch[1, 4:])
    assert torch.equal(out[::2], two_launch[::2]) and workspace.counters[1, 0] == -5
    no_counters = DecodeAttentionWorkspace.allocate(3, 8, 4, 64, DEVICE, num_kv_heads=0)
    with pytest.raises(ValueError, match="workspace counters"):
        paged_decode_attention(*case.args, num_splits=4, workspace=no_counters)


@pytest.mark.usefixtures("fused_reduce")
def test_fused_reduce_with_the_callers_counters() -> None:
    """No workspace, the caller's counters (what TritonAttention passes: one tensor for every
    layer, zeroed once): the two-launch path's output, the counters left at zero and used in
    place (no tensor of the launcher's own)."""
    from engine.triton_attention import TritonAttention

    dtype = DTYPES[0]
    case = make_case([0, 40, 300, 17], 8, 2, 64, 16, dtype, seed=23)
    decode_attention.FUSED_REDUCE = False
    two_launch = paged_decode_attention(*case.args, num_splits=4)
    decode_attention.FUSED_REDUCE = True
    backend = TritonAttention()
    counters = backend._decode_counters(4, 2, case.q.device)
    assert backend._decode_counters(3, 2, case.q.device) is counters  # kept across calls
    for _ in range(2):
        out = paged_decode_attention(*case.args, num_splits=4, counters=counters)
        assert torch.equal(out, two_launch) and torch.count_nonzero(counters) == 0
    counters[2, 1] = -9  # the launcher merged with these very counters: that group is not
    out = torch.full_like(case.q, float("nan"))
    paged_decode_attention(*case.args, out=out, num_splits=4, counters=counters)
    assert out[2, 4:].isnan().all() and torch.equal(out[2, :4], two_launch[2, :4])
    assert torch.equal(out[:2], two_launch[:2]) and counters[2, 1] == -5
    grown = backend._decode_counters(8, 2, case.q.device)  # grows when short, and keeps the
    kept = backend._all_counters
    assert grown.shape == (8, 2) and len(kept) == 2 and kept[0] is counters and kept[1] is grown


@needs_cuda
@pytest.mark.gpu
@pytest.mark.usefixtures("fused_reduce")
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("cache", ["bf16", "fp8_per_head", "fp8_per_token"])
def test_fused_reduce_matches_two_launches_in_a_cuda_graph(batch: int, cache: str) -> None:
    """Llama-3-8B heads (32 over 8 kv heads, head_dim 128), bf16 or e4m3 cache: the fused
    merge inside a CUDA graph, replayed several times with new contexts of 0 to 4096 tokens
    (the counters must come back to zero each time), gives the two-launch path's outputs and
    amaxes bit for bit (the same merge code, 4 warps both: the same reduction order)."""
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(batch)
    lens = [4096, *torch.randint(0, 4097, (batch - 1,), generator=gen).tolist()]
    case = make_case(lens, 32, 8, 128, 16, dtype, seed=31 + batch)  # tables fit 4096 a row
    q, k_cache, v_cache, tables, context_lens, scale = case.args
    k_scale = v_scale = None
    if cache == "fp8_per_token":
        k_scale = 0.5 + torch.rand(k_cache.shape[:3], generator=gen).to(DEVICE)
        v_scale = 0.5 + torch.rand(v_cache.shape[:3], generator=gen).to(DEVICE)
    elif cache == "fp8_per_head":  # broadcast views, as engine.kv_quant.layer_fp8_views
        k_scale = (0.5 + torch.rand(8, generator=gen)).to(DEVICE).expand(k_cache.shape[:3])
        v_scale = (0.5 + torch.rand(8, generator=gen)).to(DEVICE).expand(v_cache.shape[:3])
    if k_scale is not None and v_scale is not None:
        k_cache = (k_cache.float() / k_scale[..., None]).to(torch.float8_e4m3fn)
        v_cache = (v_cache.float() / v_scale[..., None]).to(torch.float8_e4m3fn)
    num_splits = choose_num_splits(batch, 8, tables.shape[1], 16, q.device)
    num_splits = max(num_splits, 3)  # batch 64 asks for one split: merge anyway
    workspace = DecodeAttentionWorkspace.allocate(batch, 32, num_splits, 128, DEVICE, 8)
    outs = {f: torch.empty_like(q) for f in (False, True)}
    amaxes = {f: torch.empty(batch, 32, device=DEVICE) for f in (False, True)}

    def run(fused: bool) -> None:
        decode_attention.FUSED_REDUCE = fused
        paged_decode_attention(
            q, k_cache, v_cache, tables, context_lens, scale, out=outs[fused],
            num_splits=num_splits, workspace=workspace, k_scale=k_scale, v_scale=v_scale,
            amax_out=amaxes[fused],
        )  # fmt: skip

    for fused in (False, True):
        run(fused)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(False)
        run(True)
    batch_1_lens = [4096, 1, 127, 129, 0, 2000]
    for replay in range(6):
        if batch == 1:
            context_lens.fill_(batch_1_lens[replay])
        elif replay:
            new_lens = torch.randint(0, 4097, (batch,), generator=gen)
            new_lens[:4] = torch.tensor([1, 0, 4096, 128])
            context_lens.copy_(new_lens)
        for fused in (False, True):
            outs[fused].fill_(float("nan"))
            amaxes[fused].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(outs[True], outs[False]), f"replay {replay}"
        assert torch.equal(amaxes[True], amaxes[False]), f"replay {replay}"
        assert torch.count_nonzero(workspace.counters) == 0, f"replay {replay}"

"""The per-head FP8 KV cache (`kv_cache_scales="per_head"`, the default with
`kv_cache_dtype="fp8"`) on CPU, tiny dummy model.

The cache is int8 storage of e4m3 values only, exactly half a bf16 cache; its scales, one fp32
per (layer, K|V, kv head), are calibrated once at start-up (engine.kv_calibration) as powers of
two with 2-4x headroom over what calibration saw, live in LlamaModel.kv_scales, and every layer
reads its own row of them. KV transfer names them by a digest in the layout's scale scheme, so
workers whose scales differ are refused (kvtransfer.layout). Engine behaviour with either
scheme: tests/unit/test_fp8_kv_engine.py; the kernels: tests/unit/kernels/test_fp8_kv.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from contracts.errors import KVTransferError
from engine import build
from engine.config import EngineConfig
from engine.engine import Engine
from engine.kv_calibration import (
    MAX_CALIBRATION_TOKENS,
    calibrate_kv_amax,
    calibration_ids,
    save_kv_scales,
)
from engine.kv_quant import (
    KV_FP8_DTYPE,
    calibrated_scales,
    fp8_row_bytes,
    fp8_storage,
    is_fp8_cache,
    is_per_head_fp8_cache,
    scales_digest,
)
from kvtransfer.codec import decode, encode
from kvtransfer.layout import KVLayout
from kvtransfer.messages import MAX_DTYPE_BYTES, TransferOffer
from tests.conftest import greedy, make_engine, prompt_ids

DIGEST = "0123456789abcdef"


def per_head_engine(**kwargs: object) -> Engine:
    return make_engine(kv_cache_dtype="fp8", **kwargs)  # type: ignore[arg-type]


def layout(scale_scheme: str = f"per_head_fp32:{DIGEST}", **changes: object) -> KVLayout:
    """SmolLM2-135M's cache geometry with 16-token blocks, FP8 with per-head scales."""
    fields: dict[str, object] = {
        "model_id": "smollm2-135m",
        "dtype": "float8_e4m3fn",
        "block_size": 16,
        "num_layers": 30,
        "num_kv_heads": 3,
        "head_dim": 64,
        "scale_scheme": scale_scheme,
    }
    return KVLayout(**{**fields, **changes})  # type: ignore[arg-type]


# ---- the cache and its size


def test_the_default_fp8_cache_is_int8_e4m3_values_only() -> None:
    engine = per_head_engine()
    cache, config = engine.runner.kv_cache, engine.model_config
    assert engine.config.kv_cache_scales == "per_head"  # the default
    assert cache.dtype == torch.int8 and is_per_head_fp8_cache(cache) and not is_fp8_cache(cache)
    assert cache.shape == (config.num_layers, 2, 64, 4, config.num_kv_heads, config.head_dim)
    engine.generate([prompt_ids(1, 13)], greedy(4))
    values = cache.view(KV_FP8_DTYPE).float()
    assert values.abs().amax() > 0 and values.isfinite().all()  # e4m3 values were written
    assert values.abs().amax() <= 448


def blocks_in(kv_cache_bytes: int, kv_cache_dtype: str, kv_cache_scales: str) -> Engine:
    return Engine(
        EngineConfig(
            model="dummy:tiny", device="cpu", dtype="bfloat16", kv_cache_bytes=kv_cache_bytes,
            kv_cache_dtype=kv_cache_dtype, kv_cache_scales=kv_cache_scales,
        )
    )  # fmt: skip


def test_the_same_bytes_hold_exactly_twice_the_blocks_of_bf16() -> None:
    """No scale bytes in the blocks: a bf16 budget of N blocks holds 2N per-head FP8 blocks in
    the same bytes; the packed (per-token) cache carries 4 bytes a row more, so fewer."""
    config = make_engine().model_config  # head_dim 16: rows of 16 bytes against 32 (20 packed)
    bf16_per_token = build.kv_bytes_per_token(config, torch.bfloat16, torch.bfloat16)
    assert 2 * build.kv_bytes_per_token(config, KV_FP8_DTYPE, torch.bfloat16) == bf16_per_token
    budget = bf16_per_token * 16 * 100  # 100 bf16 blocks of 16 tokens, exactly
    bf16 = blocks_in(budget, "auto", "per_head")  # (scales ignored without fp8)
    per_head = blocks_in(budget, "fp8", "per_head")
    per_token = blocks_in(budget, "fp8", "per_token")
    assert (bf16.num_kv_blocks, per_head.num_kv_blocks) == (100, 200)
    assert per_head.runner.kv_cache.nbytes == bf16.runner.kv_cache.nbytes == budget
    assert 100 < per_token.num_kv_blocks == 100 * 32 // 20 < 200
    assert bf16.kv_scales_digest is None and bf16.model.kv_scales is None  # no calibration


def test_row_bytes_and_storage_of_each_scheme() -> None:
    assert (fp8_row_bytes(128, "per_head"), fp8_row_bytes(128, "per_token")) == (128, 132)
    assert (fp8_storage("per_head"), fp8_storage("per_token")) == (torch.int8, torch.uint8)
    for bad in (lambda: fp8_storage("per_tensor"), lambda: fp8_row_bytes(128, "per-head")):
        with pytest.raises(ValueError, match=r"kv_cache_scales=.* must be one of"):
            bad()


def test_an_unknown_scheme_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError) as info:
        EngineConfig(kv_cache_scales="bogus")
    assert str(info.value) == "kv_cache_scales='bogus' must be one of ('per_head', 'per_token')"


@pytest.mark.parametrize(
    ("argv", "scales"),
    [([], "per_head"), (["--kv-cache-scales", "per-token"], "per_token"),
     (["--kv-cache-scales", "per-head"], "per_head")],
)  # fmt: skip
def test_serve_passes_the_scheme_to_both_pools(argv: list[str], scales: str) -> None:
    from cluster.cli import build_parser, engine_config

    args = build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8", *argv])
    for pool in ("prefill", "decode"):
        config = engine_config(args, pool)
        assert (config.kv_cache_dtype, config.kv_cache_scales) == ("fp8", scales)


# ---- calibration


def test_calibrated_scales_are_powers_of_two_with_two_to_four_times_headroom() -> None:
    gen = torch.Generator().manual_seed(0)
    amax = torch.exp2(torch.rand(1000, generator=gen) * 40 - 20)  # 2^-20 .. 2^20
    amax = torch.cat([amax, torch.tensor([224.0, 224.0001, 1.0, 3e-3, 65504.0])])
    scales = calibrated_scales(amax)
    assert scales.dtype == torch.float32 and scales.shape == amax.shape
    assert torch.equal(scales, torch.exp2(torch.log2(scales).round()))  # powers of two
    assert (scales >= amax * 2 / 448).all()  # amax * 2 stored unclipped ...
    assert (scales < amax * 4 / 448).all()  # ... and no more than twice that room
    assert scales[-5:-3].tolist() == [1.0, 2.0]  # 224 * 2 maps to 448 exactly; above, 2x
    for zero in (torch.zeros(3), torch.tensor([0.0, 1e-30])):
        tiny = calibrated_scales(zero)
        assert (tiny > 0).all() and tiny.isfinite().all()  # a head never seen non-zero
        assert torch.equal(tiny, torch.exp2(torch.log2(tiny).round()))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_calibration_is_refused_with_the_way_out(bad: float) -> None:
    with pytest.raises(ValueError, match=r"non-finite keys or values.*per_token"):
        calibrated_scales(torch.tensor([1.0, bad]))


def test_calibration_is_deterministic_and_every_layer_reads_its_row() -> None:
    first, second = per_head_engine(), per_head_engine()
    digest = first.kv_scales_digest
    assert digest is not None and len(digest) == 16 and set(digest) <= set("0123456789abcdef")
    assert second.kv_scales_digest == digest
    scales = first.model.kv_scales
    assert scales is not None and second.model.kv_scales is not None
    assert torch.equal(second.model.kv_scales, scales)
    assert digest == scales_digest(scales)
    config = first.model_config
    assert scales.shape == (config.num_layers, 2, config.num_kv_heads)
    assert scales.dtype == torch.float32 and (scales > 0).all()
    for i, layer in enumerate(first.model.decoder_layers):
        attention = layer.self_attn
        assert attention.kv_scales is not None
        assert attention.kv_scales.data_ptr() == scales[i].data_ptr()  # a view, not a copy
        assert attention.kv_scales.shape == (2, config.num_kv_heads)
        assert attention.backend is first.backend  # calibration's own backend is gone


def test_calibration_measures_the_weights() -> None:
    """Layer 0's input norm scaled by 8 (exactly: a power of two) scales its K and V by 8, and
    so its scales, and the table's digest changes with them."""
    engine = per_head_engine()
    model, config = engine.model, engine.model_config
    ids = calibration_ids(engine.tokenizer, config.vocab_size, config.max_position_embeddings)
    before = calibrated_scales(calibrate_kv_amax(model, ids, engine.device))
    assert model.kv_scales is not None and torch.equal(before, model.kv_scales)
    with torch.no_grad():
        model.decoder_layers[0].input_layernorm.weight.mul_(8)
    after = calibrated_scales(calibrate_kv_amax(model, ids, engine.device))
    assert torch.equal(after[0], before[0] * 8)
    assert scales_digest(after) != scales_digest(before)


def test_calibration_stays_inside_the_model_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose context is shorter than the calibration text calibrates on a prefix of
    it (failed before: the rotary tables ran out, IndexError at position 256)."""
    from engine.model_config import NAMED_SHAPES

    assert len(calibration_ids(None, 1000, 10**6)) == MAX_CALIBRATION_TOKENS
    assert len(calibration_ids(None, 1000, 256)) == 256
    short = NAMED_SHAPES["tiny"].replace(max_position_embeddings=256)
    monkeypatch.setitem(NAMED_SHAPES, "tiny-short-context", short)
    engine = make_engine("dummy:tiny-short-context", kv_cache_dtype="fp8")
    assert engine.model.kv_scales is not None and engine.kv_scales_digest is not None


def test_a_digest_names_every_scale() -> None:
    scales = torch.full((2, 2, 3), 2.0**-8)
    digests = {scales_digest(scales)}
    for index in [(0, 0, 0), (1, 1, 2), (0, 1, 1)]:
        changed = scales.clone()
        changed[index] *= 2
        digests.add(scales_digest(changed))
    assert len(digests) == 4
    assert scales_digest(scales.clone()) == scales_digest(scales)


# ---- KV transfer: the layout names the scales


def test_the_layout_of_a_per_head_cache_names_its_scales() -> None:
    engine = per_head_engine()
    cache = engine.runner.kv_cache
    with pytest.raises(ValueError, match="needs its scales' digest"):
        KVLayout.of_cache(cache, engine.model_id)
    assert engine.kv_scales_digest is not None
    mine = KVLayout.of_cache(cache, engine.model_id, scales_digest=engine.kv_scales_digest)
    config = engine.model_config
    assert mine == KVLayout(
        model_id=engine.model_id,
        dtype="float8_e4m3fn",
        block_size=4,
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        scale_scheme=f"per_head_fp32:{engine.kv_scales_digest}",
    )
    one_block = cache[:, :, 0]
    assert mine.bytes_per_block == one_block.numel() * one_block.element_size()
    mine.check_cache(cache)
    with pytest.raises(ValueError, match="scale_scheme="):  # a digest must be 16 hex digits
        KVLayout.of_cache(cache, engine.model_id, scales_digest="ABC")


def test_a_per_head_block_is_half_a_bf16_block() -> None:
    per_token = layout("block_tail_fp32")
    assert layout().bytes_per_block * 2 == layout("none", dtype="bfloat16").bytes_per_block
    assert layout().bytes_per_block == 2 * 30 * 16 * 3 * 64
    assert per_token.bytes_per_block == 2 * 30 * 16 * 3 * (64 + 4)


def test_a_per_head_layout_travels_whole() -> None:
    mine = layout()
    assert KVLayout.from_wire(mine.to_wire()) == mine
    offer = TransferOffer("t", "r", mine, 5, (1, 2), 1000)
    assert decode(encode(offer)) == offer
    assert f"float8_e4m3fn/per_head_fp32:{DIGEST}".encode() in encode(offer)
    assert KVLayout.split_wire_dtype(mine.wire_dtype) == (mine.dtype, mine.scale_scheme)
    assert len(mine.wire_dtype) <= MAX_DTYPE_BYTES


def test_per_head_layouts_pair_only_with_the_same_scales() -> None:
    layout().check_compatible(layout())  # raises if not
    layout().check_compatible(layout(tensor_parallel_size=3))
    other = "fedcba9876543210"
    with pytest.raises(KVTransferError) as info:
        layout().check_compatible(layout(f"per_head_fp32:{other}"))
    assert str(info.value) == (
        f"layouts differ: scale_scheme per_head_fp32:{DIGEST} != per_head_fp32:{other}, the "
        "per-head FP8 KV scales differ (each worker calibrates them at start-up: another "
        "model, weights, code or calibration)"
    )


@pytest.mark.parametrize(
    ("theirs", "differ"),
    [
        (layout("block_tail_fp32"), f"scale_scheme per_head_fp32:{DIGEST} != block_tail_fp32"),
        (
            layout("none", dtype="bfloat16"),
            f"dtype float8_e4m3fn != bfloat16, scale_scheme per_head_fp32:{DIGEST} != none",
        ),
    ],
)
def test_a_per_head_layout_refuses_other_schemes(theirs: KVLayout, differ: str) -> None:
    with pytest.raises(KVTransferError) as info:
        layout().check_compatible(theirs)
    assert str(info.value) == f"layouts differ: {differ}"
    assert "per-head FP8 KV scales differ" not in str(info.value)


def test_a_per_head_prefill_worker_states_its_scales() -> None:
    """The worker's layout (what it pairs with) carries its engine's digest
    (worker.base)."""
    from prefill_worker.actor import PrefillWorker

    config = EngineConfig(
        model="dummy:tiny", device="cpu", num_kv_blocks=16, block_size=4, kv_cache_dtype="fp8"
    )
    worker = PrefillWorker(config, "prefill-0")
    try:
        assert worker.engine.kv_scales_digest is not None
        assert worker.layout.scale_scheme == f"per_head_fp32:{worker.engine.kv_scales_digest}"
        assert worker.layout.bytes_per_block * 2 == (
            KVLayout.of_cache(torch.zeros_like(worker.engine.runner.kv_cache, dtype=torch.bfloat16),
                              worker.engine.model_id).bytes_per_block
        )  # fmt: skip
    finally:
        worker.shutdown()


# ---- a shared scale table (kv_cache_scales_path, `tandem calibrate-kv`)


def test_a_saved_table_loads_in_place_of_calibration(tmp_path: Path) -> None:
    calibrated = per_head_engine()
    assert calibrated.kv_scales_table is not None
    path = tmp_path / "scales.json"
    save_kv_scales(path, calibrated.kv_scales_table, calibrated.model_id)
    loaded = per_head_engine(kv_cache_scales_path=str(path))
    assert loaded.kv_scales_digest == calibrated.kv_scales_digest
    assert torch.equal(loaded.model.kv_scales, calibrated.model.kv_scales)  # type: ignore[arg-type]
    # a changed file is what the engine holds: it loaded, it did not calibrate
    data = json.loads(path.read_text())
    data["scales"][1][0][0] *= 2
    path.write_text(json.dumps(data))
    changed = per_head_engine(kv_cache_scales_path=str(path))
    assert changed.kv_scales_digest != calibrated.kv_scales_digest
    assert changed.model.kv_scales is not None and calibrated.model.kv_scales is not None
    assert changed.model.kv_scales[1, 0, 0] == 2 * calibrated.model.kv_scales[1, 0, 0]
    # and it still serves
    assert len(changed.generate([prompt_ids(1, 9)], greedy(4))[0].token_ids) == 4


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read it"),
        ("{not json", "cannot read it"),
        ('{"format": "other/1"}', "not a tandem-kv-scales/1 file"),
        ('{"format": "tandem-kv-scales/1"}', "bad scales"),
        ('{"format": "tandem-kv-scales/1", "scales": [[[1.0], [1.0]]]}', "do not fit"),
        ("INF", "finite and > 0"),
        ("NEG", "finite and > 0"),
    ],
)
def test_a_bad_scale_file_is_refused_naming_it_and_the_problem(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "scales.json"
    if content in ("INF", "NEG"):
        good = per_head_engine()
        assert good.kv_scales_table is not None
        table = good.kv_scales_table.clone()
        table[0, 1, 0] = float("inf") if content == "INF" else -1.0
        save_kv_scales(path, table, good.model_id)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"{str(path)!r}") + ".*" + message):
        per_head_engine(kv_cache_scales_path=str(path))


def test_a_scale_file_needs_a_per_head_fp8_cache() -> None:
    for kwargs in ({"kv_cache_dtype": "auto"}, {"kv_cache_scales": "per_token"}):
        options = {"kv_cache_dtype": "fp8", **kwargs}
        with pytest.raises(ValueError, match="kv_cache_scales_path is a per-head FP8 scale table"):
            EngineConfig(kv_cache_scales_path="scales.json", **options)  # type: ignore[arg-type]


def test_an_engine_whose_calibration_overflows_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.engine as engine_module

    real = engine_module.calibrate_kv_amax

    def overflowing(*args: object) -> torch.Tensor:
        amax = real(*args).clone()  # type: ignore[arg-type]
        amax[1, 0, 0] = float("inf")
        return amax

    monkeypatch.setattr(engine_module, "calibrate_kv_amax", overflowing)
    with pytest.raises(ValueError, match=r"non-finite keys or values.*per_token"):
        per_head_engine()
    assert per_head_engine(kv_cache_scales="per_token").kv_scales_digest is None  # the way out

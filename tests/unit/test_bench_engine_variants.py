"""bench.engine_variants: variant names to engine options and module switches."""

from __future__ import annotations

import pytest

from bench.engine_variants import apply_switches, parse_variant


def test_names_map_to_engine_options() -> None:
    variant = parse_variant("w8+gemv+fusedq+pdl")
    assert variant.engine_options() == {
        "quantization": "fp8",
        "kv_cache_dtype": "auto",
        "triton_gemv": True,
        "fused_fp8_quant": True,
        "overlap_outputs": None,
        "kv_cache_scales": "per_head",
    }
    assert variant.pdl and not variant.dense_prefill
    assert parse_variant("bf16+overlap").engine_options()["overlap_outputs"] is True
    assert parse_variant("bf16+sync").engine_options()["overlap_outputs"] is False
    bf16 = parse_variant("bf16+dense")
    assert bf16.quantization is None and bf16.dense_prefill and not bf16.triton_gemv
    assert parse_variant("w8kv8").kv_cache_dtype == "fp8"
    kv8 = parse_variant("kv8+pertoken")
    assert (kv8.quantization, kv8.kv_cache_dtype, kv8.kv_cache_scales) == (None, "fp8", "per_token")
    varlen = parse_variant("bf16+varlen")  # one FlashAttention call: the dense path, bf16 too
    assert varlen.dense_varlen and varlen.dense_prefill is True
    assert not parse_variant("bf16+dense").dense_varlen


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("fp16", "unknown base 'fp16'"),
        ("bf16+fast", "switches must be distinct ones of"),
        ("w8+gemv+gemv", "switches must be distinct ones of"),
        ("bf16+fusedq", "+fusedq needs FP8 weights"),
        ("w8kv8+onepass", "+onepass needs +fusedq"),
        ("w8+pdl", "+pdl needs +gemv"),
        ("bf16+overlap+sync", "+overlap and +sync contradict each other"),
        ("w8+pertoken", "+pertoken needs an FP8 KV cache"),
        ("kv8+dense+paged", "+paged contradicts +dense and +varlen"),
        ("bf16+varlen+paged", "+paged contradicts +dense and +varlen"),
    ],
)
def test_bad_names_are_refused_with_the_reason(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        parse_variant(name)


def test_switches_are_set_and_cleared() -> None:
    import engine.cuda_graph as cuda_graph
    import engine.engine as engine_module
    import engine.kernels.decode_attention as decode_attention
    import engine.kernels.gemv as gemv_module
    import engine.kernels.silu_and_mul as silu_and_mul
    import engine.llama as llama
    import engine.triton_attention as triton_attention

    before = (
        gemv_module.USE_PDL,
        triton_attention.DENSE_FRESH_PREFILL,
        triton_attention.DENSE_VARLEN,
        engine_module.GREEDY_AT_LAUNCH,
        triton_attention.FUSED_ROTARY_KV_WRITE,
        llama.GEMV_QUANTIZES,
        cuda_graph.GRAPH_PIECES,
        decode_attention.FUSED_REDUCE,
        engine_module.FOLLOW_DECODES,
        llama.GEMV_ROTARY_KV,
        llama.GEMV_SILU_MUL,
        silu_and_mul.ONE_PASS_MAX_COLUMNS,
    )
    try:
        apply_switches(parse_variant("bf16+gemv+pdl+dense"))
        assert gemv_module.USE_PDL and triton_attention.DENSE_FRESH_PREFILL
        apply_switches(parse_variant("bf16"))
        assert not gemv_module.USE_PDL and triton_attention.DENSE_FRESH_PREFILL is None
        apply_switches(parse_variant("kv8+paged"))
        assert triton_attention.DENSE_FRESH_PREFILL is False
        apply_switches(parse_variant("bf16+varlen"))
        assert triton_attention.DENSE_VARLEN and triton_attention.DENSE_FRESH_PREFILL is True
        apply_switches(parse_variant("bf16"))
        assert not triton_attention.DENSE_VARLEN and engine_module.GREEDY_AT_LAUNCH
        apply_switches(parse_variant("bf16+lateargmax"))
        assert engine_module.GREEDY_AT_LAUNCH is False
        assert triton_attention.FUSED_ROTARY_KV_WRITE
        apply_switches(parse_variant("w8kv8+tworot"))
        assert triton_attention.FUSED_ROTARY_KV_WRITE is False and llama.GEMV_QUANTIZES
        apply_switches(parse_variant("w8+gemv+fusedq+sepq"))
        assert llama.GEMV_QUANTIZES is False and cuda_graph.GRAPH_PIECES == 4
        apply_switches(parse_variant("bf16+onegraph"))
        assert cuda_graph.GRAPH_PIECES == 1 and decode_attention.FUSED_REDUCE is False
        apply_switches(parse_variant("kv8+fusedreduce"))
        assert decode_attention.FUSED_REDUCE is True and cuda_graph.GRAPH_PIECES == 4
        apply_switches(parse_variant("w8kv8"))
        assert decode_attention.FUSED_REDUCE is False and engine_module.FOLLOW_DECODES
        apply_switches(parse_variant("w8kv8+nofollow"))
        assert engine_module.FOLLOW_DECODES is False and llama.GEMV_ROTARY_KV
        apply_switches(parse_variant("w8kv8+gemv+sepkv"))
        assert llama.GEMV_ROTARY_KV is False and engine_module.FOLLOW_DECODES
        assert llama.GEMV_SILU_MUL
        apply_switches(parse_variant("bf16+gemv+sepsilu"))
        assert llama.GEMV_SILU_MUL is False and llama.GEMV_ROTARY_KV
        assert silu_and_mul.ONE_PASS_MAX_COLUMNS == 0
        apply_switches(parse_variant("w8kv8+fusedq+onepass"))
        assert silu_and_mul.ONE_PASS_MAX_COLUMNS == silu_and_mul.ONE_PASS_COLUMNS > 0
        assert llama.GEMV_SILU_MUL
    finally:
        (
            gemv_module.USE_PDL,
            triton_attention.DENSE_FRESH_PREFILL,
            triton_attention.DENSE_VARLEN,
            engine_module.GREEDY_AT_LAUNCH,
            triton_attention.FUSED_ROTARY_KV_WRITE,
            llama.GEMV_QUANTIZES,
            cuda_graph.GRAPH_PIECES,
            decode_attention.FUSED_REDUCE,
            engine_module.FOLLOW_DECODES,
            llama.GEMV_ROTARY_KV,
            llama.GEMV_SILU_MUL,
            silu_and_mul.ONE_PASS_MAX_COLUMNS,
        ) = before

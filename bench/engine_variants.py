"""Named engine variants for the GPU benchmarks (bench.fp8_gpu, bench.engine_saturation).

A variant is a base, `bf16` (bf16 weights and KV), `kv8` (bf16 weights, FP8 KV cache), `w8`
(FP8 W8A8 projections, bf16 KV) or `w8kv8` (FP8 projections and FP8 KV cache), followed by any
of these switches:

    +gemv     EngineConfig.triton_gemv: single-row projections through the Triton GEMV
              (engine.kernels.gemv, or engine.kernels.fp8_gemv for FP8 weights)
    +fusedq   EngineConfig.fused_fp8_quant: the activations' per-token FP8 quantization inside
              the RMSNorm and SiLU-and-mul kernels (FP8 weights only)
    +pdl      engine.kernels.gemv.USE_PDL: the GEMVs with programmatic dependent launch (needs
              +gemv)
    +dense    engine.triton_attention.DENSE_FRESH_PREFILL=True: steps whose prefill chunks all
              start their sequence attend through torch's fused SDPA (the default for FP8 KV)
    +varlen   engine.triton_attention.DENSE_VARLEN=True: a step whose dense chunks hold at
              least half of its prefill rows makes one variable-length FlashAttention-2 call
              (implies the dense path for bf16 too)
    +paged    DENSE_FRESH_PREFILL=False: every prefill chunk through the paged kernel (the
              default for bf16 KV)
    +overlap  EngineConfig.overlap_outputs=True: each step launched before the previous one's
              text and outputs are made (the engine's default on CUDA)
    +sync     EngineConfig.overlap_outputs=False: each step's outputs made before the next
              step is launched (the baseline of +overlap)
    +pertoken EngineConfig.kv_cache_scales="per_token": the FP8 KV cache's scales one per token
              and head inside each block (the default: per head, calibrated; FP8 KV only)
    +tworot   engine.triton_attention.FUSED_ROTARY_KV_WRITE=False: the rotary kernel, then the
              KV write (the baseline of the fused launch, the default)
    +sepq     engine.llama.GEMV_QUANTIZES=False: single-row o_proj and down_proj inputs quantized
              by their own kernel, not inside the FP8 GEMV (the baseline of the default)
    +onegraph engine.cuda_graph.GRAPH_PIECES=1: each decode step one CUDA graph, not pieces
              (the baseline of the default)
    +lateargmax engine.engine.GREEDY_AT_LAUNCH=False: greedy steps take their argmax when they
              are collected, not queued behind the step at launch (the baseline of the default)
    +fusedreduce engine.kernels.decode_attention.FUSED_REDUCE=True: with several splits, the
              last split program of each group merges them, no reduce launch (off by default:
              slower on an H100)
    +nofollow engine.engine.FOLLOW_DECODES=False: every step launched after the one before it
              is collected (the baseline of the default: greedy decodes follow one another)
    +sepkv    engine.llama.GEMV_ROTARY_KV=False: single-row QKV GEMVs store q, k, v and the
              rotary + KV write runs in its own launch (the baseline of the default: the
              GEMV's epilogue rotates and writes the cache; needs +gemv to mean anything)
    +sepsilu  engine.llama.GEMV_SILU_MUL=False: single-row gate_up GEMVs store gate and up
              and SiLU-and-mul runs in its own launch (the baseline of the default: the
              GEMV's epilogue computes it; needs +gemv to mean anything)
    +onepass  engine.kernels.silu_and_mul.ONE_PASS_MAX_COLUMNS=ONE_PASS_COLUMNS: the fused
              SiLU-and-mul FP8 quantization of multi-row steps holds each row in registers and
              reads it once, not twice (off by default until timed; FP8 weights, +fusedq)

e.g. `w8+gemv+fusedq+pdl`. `+pdl`, `+dense`, `+varlen`, `+paged`, `+tworot`, `+sepq`,
`+onegraph`, `+lateargmax`, `+fusedreduce`, `+nofollow`, `+sepkv`, `+sepsilu` and `+onepass` are
module switches: `apply_switches` sets them for the engine built next (graphs capture them), so
build and measure one variant at a time; they are set in this process only, so at
tensor-parallel size > 1 they reach rank 0 alone (the other ranks are processes of their own).
"""

from __future__ import annotations

from dataclasses import dataclass

BASES: dict[str, tuple[str | None, str]] = {
    "bf16": (None, "auto"),
    "kv8": (None, "fp8"),
    "w8": ("fp8", "auto"),
    "w8kv8": ("fp8", "fp8"),
}
SWITCHES = (
    "gemv",
    "fusedq",
    "pdl",
    "dense",
    "varlen",
    "paged",
    "overlap",
    "sync",
    "pertoken",
    "lateargmax",
    "tworot",
    "sepq",
    "onegraph",
    "fusedreduce",
    "nofollow",
    "sepkv",
    "sepsilu",
    "onepass",
)


@dataclass(frozen=True)
class Variant:
    name: str
    quantization: str | None
    kv_cache_dtype: str
    triton_gemv: bool = False
    fused_fp8_quant: bool = False
    pdl: bool = False
    dense_prefill: bool | None = None  # None: the engine's default
    overlap_outputs: bool | None = None  # None: the engine's default
    kv_cache_scales: str = "per_head"
    dense_varlen: bool = False
    late_argmax: bool = False
    two_rotary_launches: bool = False
    separate_quant: bool = False
    one_graph: bool = False
    fused_reduce: bool = False
    no_follow: bool = False
    separate_rotary_kv: bool = False
    separate_silu_mul: bool = False
    one_pass_silu_fp8: bool = False

    def engine_options(self) -> dict[str, object]:
        """EngineConfig keyword arguments of this variant."""
        return {
            "quantization": self.quantization,
            "kv_cache_dtype": self.kv_cache_dtype,
            "triton_gemv": self.triton_gemv,
            "fused_fp8_quant": self.fused_fp8_quant,
            "overlap_outputs": self.overlap_outputs,
            "kv_cache_scales": self.kv_cache_scales,
        }


def parse_variant(name: str) -> Variant:
    """The variant named `name`; ValueError naming what is wrong and what is known."""
    base, *switches = name.split("+")
    if base not in BASES:
        raise ValueError(
            f"variant {name!r}: unknown base {base!r}; known: {', '.join(BASES)} "
            f"(then any of {', '.join('+' + s for s in SWITCHES)})"
        )
    unknown = [s for s in switches if s not in SWITCHES]
    if unknown or len(set(switches)) != len(switches):
        raise ValueError(
            f"variant {name!r}: switches must be distinct ones of "
            f"{', '.join('+' + s for s in SWITCHES)}, got {'+'.join(switches)!r}"
        )
    quantization, kv_cache_dtype = BASES[base]
    if "fusedq" in switches and quantization != "fp8":
        raise ValueError(f"variant {name!r}: +fusedq needs FP8 weights (w8 or w8kv8)")
    if "onepass" in switches and "fusedq" not in switches:
        raise ValueError(f"variant {name!r}: +onepass needs +fusedq (its kernel's switch)")
    if "paged" in switches and ("dense" in switches or "varlen" in switches):
        raise ValueError(f"variant {name!r}: +paged contradicts +dense and +varlen")
    if "overlap" in switches and "sync" in switches:
        raise ValueError(f"variant {name!r}: +overlap and +sync contradict each other")
    if "pertoken" in switches and kv_cache_dtype != "fp8":
        raise ValueError(f"variant {name!r}: +pertoken needs an FP8 KV cache (kv8 or w8kv8)")
    if "pdl" in switches and "gemv" not in switches:
        raise ValueError(f"variant {name!r}: +pdl needs +gemv (PDL is the GEMVs' launch)")
    return Variant(
        name=name,
        quantization=quantization,
        kv_cache_dtype=kv_cache_dtype,
        triton_gemv="gemv" in switches,
        fused_fp8_quant="fusedq" in switches,
        pdl="pdl" in switches,
        dense_prefill=True
        if "dense" in switches or "varlen" in switches
        else False
        if "paged" in switches
        else None,
        overlap_outputs=True if "overlap" in switches else False if "sync" in switches else None,
        kv_cache_scales="per_token" if "pertoken" in switches else "per_head",
        dense_varlen="varlen" in switches,
        late_argmax="lateargmax" in switches,
        two_rotary_launches="tworot" in switches,
        separate_quant="sepq" in switches,
        one_graph="onegraph" in switches,
        fused_reduce="fusedreduce" in switches,
        no_follow="nofollow" in switches,
        separate_rotary_kv="sepkv" in switches,
        separate_silu_mul="sepsilu" in switches,
        one_pass_silu_fp8="onepass" in switches,
    )


def apply_switches(variant: Variant) -> None:
    """Sets the module switches of `variant` (and clears those it does not name)."""
    import engine.cuda_graph as cuda_graph
    import engine.engine as engine_module
    import engine.kernels.decode_attention as decode_attention
    import engine.kernels.gemv as gemv_module
    import engine.kernels.silu_and_mul as silu_and_mul
    import engine.llama as llama
    import engine.triton_attention as triton_attention

    cuda_graph.GRAPH_PIECES = 1 if variant.one_graph else cuda_graph.DEFAULT_GRAPH_PIECES
    cuda_graph.PINNED_INPUTS = True  # the default (bench.engine_profile's `-pinned` clears it)
    llama.GEMV_QUANTIZES = not variant.separate_quant
    llama.GEMV_ROTARY_KV = not variant.separate_rotary_kv
    llama.GEMV_SILU_MUL = not variant.separate_silu_mul
    silu_and_mul.ONE_PASS_MAX_COLUMNS = (
        silu_and_mul.ONE_PASS_COLUMNS if variant.one_pass_silu_fp8 else 0
    )
    engine_module.GREEDY_AT_LAUNCH = not variant.late_argmax
    engine_module.FOLLOW_DECODES = not variant.no_follow
    gemv_module.USE_PDL = variant.pdl
    triton_attention.DENSE_FRESH_PREFILL = variant.dense_prefill
    triton_attention.DENSE_VARLEN = variant.dense_varlen
    triton_attention.FUSED_ROTARY_KV_WRITE = not variant.two_rotary_launches
    decode_attention.FUSED_REDUCE = variant.fused_reduce

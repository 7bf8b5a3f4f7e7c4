"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over a paged KV cache.

Runs a flattened batch of tokens from many sequences (no padding). Weights are taken in
Hugging Face naming and fused at load: q/k/v into one projection, gate/up into another, so a
layer costs four matrix products. Knows nothing of scheduling, sampling or text.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from contracts.errors import ModelLoadError
from engine.attention import AttentionBackend, AttentionMetadata, OutputRows, TorchAttention
from engine.model_config import ModelConfig, RopeScaling
from engine.quantization import (
    Fp8Linear,
    Fp8Pending,
    Fp8Rows,
    collapse_fused_input_scales,
    prepare_fp8_weights,
    quantize_per_token,
    take_kv_cache_scales,
    values_of,
    widen_checkpoint_scales,
)

if TYPE_CHECKING:
    from engine.kernels.rotary_kv_epilogue import RotaryKvWrite
    from engine.parallel import TensorParallelGroup
    from engine.sharding import ShardLayout


# With fused FP8 quantization, o_proj and down_proj inputs of single-row steps are quantized
# inside the FP8 GEMV from amaxes their producers write (Fp8Pending); False: by the separate
# quantization kernel (the same bits; the baseline of A/B benchmarks).
GEMV_QUANTIZES = True
# Single-row QKV projections that run a GEMV rotate q and k and write the KV cache in the
# GEMV's epilogue (engine.kernels.rotary_kv_epilogue), not in a launch of their own
# (kv_write.rotary_write_kv); False: that launch (the same bits; the baseline of A/B
# benchmarks).
GEMV_ROTARY_KV = True
# Single-row gate_up projections that run a GEMV end in silu(gate) * up
# (engine.kernels.silu_mul_epilogue; with an FP8 down_proj that quantizes in its GEMV, also the
# amax it quantizes from), not in a launch of silu_and_mul; False: that launch (the same bits;
# the baseline of A/B benchmarks).
GEMV_SILU_MUL = True


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] fp64, with Llama-3 frequency-dependent scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Non-interleaved ("rotate half") rotary embedding with precomputed tables.

    Tables are full width so rotation is four elementwise ops:
        rotate(x) = x * cos2 + roll(x, head_dim / 2) * sin2
        cos2 = [cos, cos],  sin2 = [-sin, sin]   (each [max_positions, head_dim] fp32)
    which equals (x1 cos - x2 sin, x2 cos + x1 sin) exactly.
    """

    cos2: torch.Tensor  # buffers, declared for type checkers
    sin2: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        shape = (config.max_position_embeddings, config.head_dim)
        self.register_buffer("cos2", torch.empty(shape), persistent=False)
        self.register_buffer("sin2", torch.empty(shape), persistent=False)
        self.init_tables()

    @torch.no_grad()
    def init_tables(self) -> None:
        """(Re)compute the tables where they live (call after materializing a model built on
        the meta device)."""
        if self.cos2.is_meta:
            return
        c = self.config
        inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        positions = torch.arange(c.max_position_embeddings, dtype=torch.float64)
        angles = torch.outer(positions, inv_freq).float()  # [max_positions, head_dim // 2]
        cos, sin = angles.cos(), angles.sin()
        self.cos2.copy_(torch.cat((cos, cos), dim=-1))
        self.sin2.copy_(torch.cat((-sin, sin), dim=-1))

    def forward(self, positions: torch.Tensor) -> RotaryInputs:
        """What the layers need to rotate this step's q and k (computed once per step)."""
        if positions.is_cuda:  # the Triton kernel reads the tables itself
            return RotaryInputs(positions, self.cos2, self.sin2)
        cos = self.cos2[positions].unsqueeze(1)  # [num_tokens, 1, head_dim] fp32
        sin = self.sin2[positions].unsqueeze(1)
        return RotaryInputs(positions, cos, sin)


@dataclass(frozen=True, slots=True)
class RotaryInputs:
    positions: torch.Tensor  # [num_tokens] int64
    cos2: torch.Tensor  # CPU: [num_tokens, 1, head_dim] per token; CUDA: the whole table
    sin2: torch.Tensor


def rotate_qk(
    qkv: torch.Tensor,  # [num_tokens, (heads + 2 * kv_heads) * head_dim], on CPU
    rope: RotaryInputs,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated q [num_tokens, heads, head_dim] and k [num_tokens, kv_heads, head_dim], new
    tensors (on CUDA the backend rotates in place as it writes the K/V:
    AttentionBackend.rotate_and_write_kv)."""
    qk_size = (num_heads + num_kv_heads) * head_dim
    qk = qkv[:, :qk_size].view(-1, num_heads + num_kv_heads, head_dim)
    q, k = apply_rotary(qk, (rope.cos2, rope.sin2)).split([num_heads, num_kv_heads], dim=1)
    return q, k


def apply_rotary(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim] -> same, rotated ("rotate half" form)."""
    cos2, sin2 = cos_sin
    xf = x.float()
    rotated = xf * cos2 + xf.roll(x.shape[-1] // 2, dims=-1) * sin2
    return rotated if x.dtype == torch.float32 else rotated.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear that can pre-pack its weight for oneDNN on CPU.

    On the 2-core CPUs Tandem is developed on, oneDNN's fp32 GEMM with a packed weight runs
    1.3-2x faster than the default (MKL) path at every batch size measured (1 to 512 rows).
    `pack()` drops the dense copy unless asked to keep it (tied embeddings need it).
    """

    packed_weight: torch.Tensor | None = None
    # Run single-row (decode batch 1) inputs through the Triton GEMV (engine.kernels.gemv) on
    # CUDA; set by LlamaModel.use_triton_gemv.
    use_gemv: bool = False

    def pack(self, keep_dense: bool = False) -> None:
        if not can_pack_for_onednn(self.weight):
            return
        packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
        probe = torch.zeros(1, self.in_features)
        expected_shape = (1, self.out_features)
        if _onednn_linear(probe, packed, self.bias).shape != expected_shape:
            return
        self.packed_weight = packed
        if not keep_dense:
            self.weight.data = torch.empty(0)

    def forward(
        self, x: torch.Tensor, rotary_kv: RotaryKvWrite | None = None, silu_mul: bool = False
    ) -> torch.Tensor:
        """x @ W^T (+ bias). Where `gemv_applies` (one row), two epilogues of the GEMV: with
        `rotary_kv` (a QKV projection) it also rotates q and k and writes the KV cache; with
        `silu_mul` (a gate_up projection, no bias) it returns silu(gate) * up instead."""
        if self.gemv_applies(x.shape[0], x.dtype, x.device):
            from engine.kernels.gemv import gemv

            if (silu_mul or rotary_kv is not None) and self.bias is not None:
                raise ValueError("rotary_kv and silu_mul need a projection without bias")
            out = gemv(x, self.weight, rotary_kv=rotary_kv, silu_mul=silu_mul)
            return out if self.bias is None else out.add_(self.bias)
        if rotary_kv is not None or silu_mul:
            raise ValueError(
                "rotary_kv and silu_mul need the GEMV: one bf16/fp16 CUDA row, use_gemv on"
            )
        if self.packed_weight is None:
            return F.linear(x, self.weight, self.bias)
        return _onednn_linear(x, self.packed_weight, self.bias)

    def gemv_applies(self, num_rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether `num_rows` rows run the Triton GEMV: one bf16/fp16 CUDA row with use_gemv
        (there the GEMV beats cuBLAS; at 2-16 rows the two are within noise on the Llama-3-8B
        shapes, H100; see engine.kernels.gemv)."""
        return (
            self.use_gemv
            and device.type == "cuda"
            and num_rows == 1
            and dtype in (torch.bfloat16, torch.float16)
        )


def _onednn_linear(
    x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


def can_pack_for_onednn(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual): the residual add is fused in."""
        if x.is_cuda:  # one Triton launch; updates `residual` in place
            from engine.kernels.rms_norm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
        if x.dtype == torch.float32:  # one fused kernel
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps), x
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed.to(x.dtype)), x

    def forward_fp8(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[Fp8Rows, torch.Tensor]:
        """`forward` with its output quantized per token for an FP8 projection, in the same
        launch on CUDA (engine.kernels.rms_norm.rms_norm_fp8: bitwise what the projection's own
        quantization of `forward`'s output gives); elsewhere `forward` then quantize_per_token.
        """
        if x.is_cuda:
            from engine.kernels.rms_norm import rms_norm_fp8

            q, scale, h = rms_norm_fp8(x, self.weight, self.eps, residual)
            return Fp8Rows(q, scale, x.dtype), h
        out, h = self.forward(x, residual)
        q, scale = quantize_per_token(out)
        return Fp8Rows(q, scale, out.dtype), h


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.backend = backend
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        self.scale = config.head_dim**-0.5
        # [2, num_kv_heads] fp32 with a per-head FP8 KV cache (LlamaModel.set_kv_scales)
        self.kv_scales: torch.Tensor | None = None
        # Decode-only steps whose o_proj runs the FP8 GEMV: the attention kernels write the
        # output's amaxes and the GEMV quantizes it (Fp8Pending); set by
        # LlamaModel.use_fused_fp8_quant
        self.fused_fp8_quant = False

    def forward(
        self,
        x: torch.Tensor | Fp8Rows,  # [num_tokens, hidden], or quantized per token
        rope: RotaryInputs,
        kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, kv_heads, head_dim]
        meta: AttentionMetadata,
        output_rows: OutputRows | None = None,
    ) -> torch.Tensor:  # [num_tokens, hidden], or [len(output_rows.rows), hidden]
        """Writes every token's K/V; attends for every token, or for `output_rows` only."""
        rotary_kv = self._projection_writes_kv(x, rope, kv_cache_layer, meta)
        # [num_tokens, (heads + 2 * kv_heads) * head_dim]; with rotary_kv, the QKV GEMV's
        # epilogue rotated q and k and wrote the K/V
        qkv = self.qkv_proj(x, rotary_kv=rotary_kv)
        qk_size = self.q_size + self.kv_size
        v = qkv[:, qk_size:].view(-1, self.num_kv_heads, self.head_dim)
        if qkv.is_cuda:  # q and k rotated in place as the K/V is written: one launch (Triton)
            q = qkv[:, : self.q_size].view(-1, self.num_heads, self.head_dim)
            k = qkv[:, self.q_size : qk_size].view(-1, self.num_kv_heads, self.head_dim)
            if rotary_kv is None:
                self.backend.rotate_and_write_kv(
                    q, k, v, rope.positions, rope.cos2, rope.sin2, kv_cache_layer,
                    meta.slot_mapping, self.kv_scales,
                )  # fmt: skip
        else:
            q, k = rotate_qk(qkv, rope, self.num_heads, self.num_kv_heads, self.head_dim)
            self.backend.write_kv(kv_cache_layer, k, v, meta.slot_mapping, self.kv_scales)
        if output_rows is not None:
            if output_rows.rows.shape[0] == 0:
                return qkv.new_empty((0, self.o_proj.out_features))
            q, meta = q[output_rows.rows], output_rows.meta
        if self._o_proj_takes_pending(q, meta):
            amax = torch.empty(q.shape[0], self.num_heads, dtype=torch.float32, device=q.device)
            out = self.backend.forward(
                q, kv_cache_layer, meta, self.scale, k, v, self.kv_scales, amax_out=amax
            )
            return self.o_proj(Fp8Pending(out.reshape(-1, self.q_size), amax))
        out = self.backend.forward(q, kv_cache_layer, meta, self.scale, k, v, self.kv_scales)
        return self.o_proj(out.reshape(-1, self.q_size))

    def _projection_writes_kv(
        self,
        x: torch.Tensor | Fp8Rows,
        rope: RotaryInputs,
        kv_cache_layer: torch.Tensor,
        meta: AttentionMetadata,
    ) -> RotaryKvWrite | None:
        """Where qkv_proj runs a single CUDA row through a GEMV (no bias) and the backend's
        cache takes the epilogue's write: what that GEMV's epilogue rotates and writes."""
        rows = values_of(x)
        if (
            not GEMV_ROTARY_KV
            or rows.shape[0] != 1
            or self.qkv_proj.bias is not None
            or self.head_dim % 4  # single-row tiles: up to 2 pairs, which must divide head_dim / 2
            or not self.qkv_proj.gemv_applies(1, x.dtype, rows.device)
        ):
            return None
        caches = self.backend.epilogue_kv_views(kv_cache_layer, self.kv_scales)
        if caches is None:
            return None
        from engine.kernels.rotary_kv_epilogue import RotaryKvWrite

        k_cache, v_cache, k_scale, v_scale = caches
        return RotaryKvWrite(
            self.num_heads, self.num_kv_heads, self.head_dim, rope.positions, rope.cos2,
            rope.sin2, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale,
        )  # fmt: skip

    def _o_proj_takes_pending(self, q: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether this attention call is decode-only, on a backend that writes amaxes, and
        o_proj quantizes rows like its output in the FP8 GEMV."""
        return (
            self.fused_fp8_quant
            and GEMV_QUANTIZES
            and self.backend.writes_amax
            and meta.num_decode_tokens == q.shape[0]
            and not meta.prefills
            and isinstance(self.o_proj, Fp8Linear)
            and self.o_proj.gemv_applies(q.shape[0], q.dtype, q.device)
        )


class MLP(nn.Module):
    # Quantize silu(gate) * up for an FP8 down_proj in the SiLU-and-mul launch (CUDA only);
    # set by LlamaModel.use_fused_fp8_quant (EngineConfig.fused_fp8_quant). Not for a single
    # row: the fused kernel gives each row one program that walks it twice, which at M = 1 is
    # one program for the whole 14,336-wide row (slower on an H100 than the column-parallel
    # SiLU-and-mul plus its quantization); the values are bitwise the same either way. There,
    # where down_proj runs the FP8 GEMV, SiLU-and-mul writes the row's amax in parts and the
    # GEMV quantizes (Fp8Pending): one launch fewer, bitwise the same again.
    fused_fp8_quant: bool = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor | Fp8Rows,
        silu_amax: torch.Tensor | None = None,  # [1, AMAX_PARTS] fp32 zeros: see silu_amax_wanted
    ) -> torch.Tensor:
        if self.gemv_takes_silu(x):  # one launch: gate_up's GEMV ends in silu(gate) * up
            down = self.down_proj
            if silu_amax is not None and self.silu_amax_wanted(x):
                act = self.gate_up_proj(x, silu_mul=True, silu_amax=silu_amax)
                return down(Fp8Pending(act, silu_amax))
            return down(self.gate_up_proj(x, silu_mul=True))
        gate_up = self.gate_up_proj(x)  # [num_tokens, 2 * intermediate]
        if gate_up.is_cuda and self.fused_fp8_quant and gate_up.shape[0] > 1:
            from engine.kernels.silu_and_mul import silu_and_mul_fp8

            q, scale = silu_and_mul_fp8(gate_up)
            return self.down_proj(Fp8Rows(q, scale, gate_up.dtype))
        if gate_up.is_cuda:
            from engine.kernels.silu_and_mul import amax_parts, silu_and_mul

            down = self.down_proj
            rows, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
            if (
                self.fused_fp8_quant
                and GEMV_QUANTIZES
                and isinstance(down, Fp8Linear)
                and down.gemv_applies(rows, gate_up.dtype, gate_up.device)
            ):
                amax = torch.empty(
                    rows, amax_parts(intermediate), dtype=torch.float32, device=gate_up.device
                )
                return down(Fp8Pending(silu_and_mul(gate_up, amax_out=amax), amax))
            return down(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def gemv_takes_silu(self, x: torch.Tensor | Fp8Rows) -> bool:
        """Whether gate_up runs x (one CUDA row) through a GEMV that ends in SiLU-and-mul."""
        rows = values_of(x)
        return (
            GEMV_SILU_MUL
            and rows.shape[0] == 1
            and self.gate_up_proj.bias is None
            # the GEMVs' single-row tiles (2 or 4 rows, 1 or 2 pairs) must not split a pair
            and self.gate_up_proj.out_features % 4 == 0
            and self.gate_up_proj.gemv_applies(1, x.dtype, rows.device)
        )

    def silu_amax_wanted(self, x: torch.Tensor | Fp8Rows) -> bool:
        """Whether, where gemv_takes_silu, the epilogue should also fold the output's amax into
        parts (a zeroed [1, AMAX_PARTS] fp32 `silu_amax`) for down_proj's FP8 GEMV to quantize
        from (Fp8Pending)."""
        rows = values_of(x)
        down = self.down_proj
        return (
            self.fused_fp8_quant
            and GEMV_QUANTIZES
            and isinstance(down, Fp8Linear)
            and isinstance(self.gate_up_proj, Fp8Linear)
            and down.gemv_applies(1, x.dtype, rows.device)
        )


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend | None = None) -> None:
        super().__init__()
        self.config = config
        backend = backend or TorchAttention()
        # Given a weight, the embedding skips its random init: weights are loaded over it, and
        # on the meta device that init (normal_) alone imports torch's compiler stack (~1.4 s).
        shape = (config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape))
        self.layers = nn.ModuleList(DecoderLayer(config, backend) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Called with each layer's index once its K/V write is issued: lets a KV sender ship
        # finished layers while later ones compute (record a CUDA event in it). Not for graphs.
        self.layer_hook: Callable[[int], None] | None = None
        # Tensor parallelism (engine.parallel): this model is one rank's shard; None at TP=1.
        self.tp: TensorParallelGroup | None = None
        self.vocab_start = 0  # first vocabulary row of this rank's embedding and LM head
        self.full_vocab_size = config.vocab_size
        # RMSNorms before qkv and gate_up quantize for the FP8 projections (use_fused_fp8_quant)
        self.fused_fp8_quant = False
        # [layers, 2, num_kv_heads] fp32: the per-head FP8 KV scales (set_kv_scales), or None
        self.kv_scales: torch.Tensor | None = None
        # [layers, 2, 1 or every kv head] fp32: the KV-cache scales the checkpoint shipped
        # (quantization.take_kv_cache_scales), which a per-head FP8 cache uses as they are
        self.checkpoint_kv_scales: torch.Tensor | None = None

    def set_tensor_parallel(self, group: TensorParallelGroup, layout: ShardLayout) -> None:
        """Make this model (built from layout.local_config, loaded with sharded weights) one
        rank of `group`: embedding, attention output and MLP output are summed over the ranks,
        logits gathered from them."""
        self.tp = group
        self.vocab_start = layout.vocab_start
        self.full_vocab_size = layout.vocab_size

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_cache: torch.Tensor,  # [layers, 2, num_blocks, block_size, kv_heads, head_dim]
        meta: AttentionMetadata,
        output_rows: OutputRows | None = None,
    ) -> torch.Tensor:  # [num_tokens, hidden], or [len(output_rows.rows), hidden]
        """Hidden states of every token, or of `output_rows` only: then the last layer runs
        past its K/V write for those rows alone (see OutputRows)."""
        x = self.embed(input_ids)
        rope = self.rotary(positions)
        x, residual = self.run_layers(
            x, None, rope, kv_cache, meta, range(len(self.layers)), output_rows
        )
        if residual is None:  # nothing samples this step: only the K/V was needed
            return x
        x, _ = self.norm(x, residual)
        return x

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[num_tokens] int64 -> [num_tokens, hidden] (the first step of `forward`)."""
        if self.tp is None:
            return self.embed_tokens(input_ids)
        return self.tp.embed(self.embed_tokens.weight, input_ids, self.vocab_start)

    def run_layers(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]: the last layer's MLP output, or the embedding
        residual: torch.Tensor | None,  # [num_tokens, hidden], None before the first layer
        rope: RotaryInputs,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        layers: range,
        output_rows: OutputRows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoder layers `layers` (consecutive) of `forward`: (x, residual) after them, for the
        next layers or the final norm (residual None: output_rows selected no row, x is the
        empty attention output). A CUDA graph of a decode step captures them in pieces
        (engine.cuda_graph), so the device starts on the first layers while the host launches
        the rest."""
        last = len(self.layers) - 1
        fused_quant = self.fused_fp8_quant and x.is_cuda
        normed: torch.Tensor | Fp8Rows
        decoder_layers = self.decoder_layers
        silu_amax = None  # the MLPs' amax parts at one row (MLP.silu_amax_wanted): one memset
        first_mlp = decoder_layers[layers[0]].mlp if len(layers) else None
        if (
            fused_quant
            and first_mlp is not None
            and first_mlp.gemv_takes_silu(x)
            and first_mlp.silu_amax_wanted(x)
        ):
            from engine.kernels.silu_mul_epilogue import AMAX_PARTS

            silu_amax = torch.zeros(
                len(layers), 1, AMAX_PARTS, dtype=torch.float32, device=x.device
            )
        for j, i in enumerate(layers):
            layer = decoder_layers[i]
            if fused_quant:
                normed, residual = layer.input_layernorm.forward_fp8(x, residual)
            else:
                normed, residual = layer.input_layernorm(x, residual)
            select = output_rows if i == last else None
            h = layer.self_attn(normed, rope, kv_cache[i], meta, select)
            if self.layer_hook is not None:
                self.layer_hook(i)  # layer i's K/V is written (enqueued, on CUDA)
            if select is not None:
                residual = residual[select.rows]
                if h.shape[0] == 0:  # nothing samples this step: only the K/V was needed
                    return h, None
            if self.tp is not None:  # o_proj is row-parallel: partial sums
                h = self.tp.all_reduce(h)
            if fused_quant:
                normed, residual = layer.post_attention_layernorm.forward_fp8(h, residual)
            else:
                normed, residual = layer.post_attention_layernorm(h, residual)
            x = layer.mlp(normed, None if silu_amax is None else silu_amax[j])
            if self.tp is not None:  # so is down_proj
                x = self.tp.all_reduce(x)
        return x, residual

    def set_kv_scales(self, scales: torch.Tensor) -> None:
        """Quantize K and V with these per-head scales, [layers, 2, num_kv_heads] fp32 on the
        model's device (engine.kv_calibration makes them): the KV cache is then a per-head FP8
        cache (engine.kv_quant). ValueError for another shape."""
        want = (len(self.layers), 2, self.config.num_kv_heads)
        if tuple(scales.shape) != want or scales.dtype != torch.float32:
            raise ValueError(f"kv_scales must be fp32 {want}, got {scales.dtype} "
                             f"{tuple(scales.shape)}")  # fmt: skip
        self.kv_scales = scales
        for layer, layer_scales in zip(self.decoder_layers, scales, strict=True):
            layer.self_attn.kv_scales = layer_scales

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        return list(self.layers)  # type: ignore[arg-type]  # ModuleList of DecoderLayer

    def pack_for_cpu(self) -> None:
        """Pre-pack every projection for oneDNN (CPU fp32 only; a no-op elsewhere). Call once
        after load_weights."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack(keep_dense=module is self.lm_head and self.config.tie_word_embeddings)

    def tie_embeddings(self) -> None:
        """Share the embedding with the LM head where the config ties them (again after
        `to_empty()`, which unties them)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def use_triton_gemv(self, enabled: bool = True) -> None:
        """Route single-row bf16/fp16 CUDA inputs of every projection through the Triton GEMV,
        and those of FP8 projections through the FP8 GEMV (cuBLAS and `torch._scaled_mm` fall
        short of the copy bandwidth there)."""
        for module in self.modules():
            if isinstance(module, (Linear, Fp8Linear)):
                module.use_gemv = enabled

    def use_fused_fp8_quant(self, enabled: bool = True) -> None:
        """Quantize the activations of the FP8 projections per token inside the kernels that
        make them on CUDA (RMSNorm before qkv and gate_up, SiLU-and-mul before down; where
        o_proj and down_proj run the FP8 GEMV, the GEMV itself from amaxes the attention and
        SiLU-and-mul kernels write): bitwise the same e4m3 values and scales, three launches
        fewer per layer at several rows, four (every projection's) at one row with the GEMV.
        Raises ValueError unless every decoder projection is an Fp8Linear with dynamic
        (per-token) scales."""
        if enabled and not self.fused_fp8_quant_applies():
            raise ValueError(
                "fused_fp8_quant needs FP8 decoder projections with dynamic per-token "
                "activation scales (quantization='fp8', no static input scales)"
            )
        for layer in self.decoder_layers:
            layer.mlp.fused_fp8_quant = enabled
            layer.self_attn.fused_fp8_quant = enabled
        self.fused_fp8_quant = enabled

    def fused_fp8_quant_applies(self) -> bool:
        """Whether every decoder projection is an Fp8Linear with dynamic (per-token) activation
        scales: what use_fused_fp8_quant needs."""
        return all(
            isinstance(p, Fp8Linear) and p.input_scale is None
            for layer in self.decoder_layers
            for p in (
                layer.self_attn.qkv_proj,
                layer.self_attn.o_proj,
                layer.mlp.gate_up_proj,
                layer.mlp.down_proj,
            )
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_seqs, hidden] -> [num_seqs, vocab] fp32 (every rank's, gathered, under TP)."""
        if self.tp is None:
            return self.lm_head(hidden).float()
        logits = self.tp.all_gather(self.lm_head(hidden))  # [num_seqs, tp * vocab_shard]
        return logits[:, : self.full_vocab_size].float()

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face-named weights in, fusing q/k/v and gate/up. Consumes `weights`
        (left empty): each tensor is dropped once copied, so the checkpoint and the model are
        never both resident whole.

        Raises ModelLoadError naming any missing, unexpected or misshapen tensor.
        """
        self.checkpoint_kv_scales = take_kv_cache_scales(weights, self.config.num_layers)
        fused = prepare_fp8_weights(self, _fuse_hf_weights(weights, self.config))
        self.tie_embeddings()
        if self.config.tie_word_embeddings:
            fused.pop("lm_head.weight", None)
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(fused))
        unexpected = sorted(set(fused) - set(params))
        if missing or unexpected:
            raise ModelLoadError(
                f"weights do not match the architecture: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        for name in list(fused):
            tensor = fused.pop(name)
            param = params[name]
            if param.shape != tensor.shape:
                raise ModelLoadError(
                    f"weight {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                )
            param.copy_(tensor)


def _fuse_hf_weights(
    weights: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """HF names (`model.layers.0.self_attn.q_proj.weight`, ...) -> this module's names; moves
    the tensors out of `weights`, so each part is freed as soon as it is fused."""
    out: dict[str, torch.Tensor] = {}
    while weights:
        name, tensor = weights.popitem()
        if "rotary_emb" in name:
            continue
        out[name.removeprefix("model.")] = tensor
    widen_checkpoint_scales(out)  # FP8 checkpoints: scales in the shapes fusing expects
    qkv = ("q_proj", "k_proj", "v_proj")
    for i in range(config.num_layers):
        for kind in ("weight", "weight_scale", "input_scale"):
            _fuse(out, f"layers.{i}.self_attn", qkv, "qkv_proj", kind)
            _fuse(out, f"layers.{i}.mlp", ("gate_proj", "up_proj"), "gate_up_proj", kind)
        if config.attention_bias:
            _fuse(out, f"layers.{i}.self_attn", qkv, "qkv_proj", "bias")
    collapse_fused_input_scales(out)
    return out


def _fuse(
    weights: dict[str, torch.Tensor], prefix: str, parts: tuple[str, ...], fused: str, kind: str
) -> None:
    names = [f"{prefix}.{p}.{kind}" for p in parts]
    if not all(n in weights for n in names):
        return  # reported as missing by load_weights
    weights[f"{prefix}.{fused}.{kind}"] = torch.cat([weights.pop(n) for n in names], dim=0)

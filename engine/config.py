"""Configuration of one engine process. Torch-free; validated on construction.

Values measured at run time (how many KV blocks fit) are returned by the engine, never written
back here.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.scheduler import SchedulerConfig

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
QUANTIZATIONS = (None, "fp8")
FP8_WEIGHT_CALIBRATIONS = (None, "gptq")  # how FP8 weights are rounded (engine.fp8_gptq)
KV_CACHE_DTYPES = ("auto", "fp8")
KV_CACHE_SCALES = ("per_head", "per_token")  # of an FP8 KV cache (engine.kv_quant)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str | None = None  # a model spec (see engine.loader); None: the default model
    device: str = "auto"  # "auto": cuda if available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: sized from kv_cache_bytes
    kv_cache_bytes: int | None = None  # None: 1 GiB on CPU, kv_cache_memory_fraction on GPU
    # GPU: the KV cache takes this fraction of the memory free once the weights are loaded.
    kv_cache_memory_fraction: float = 0.85
    max_model_len: int | None = None  # None: the model's context length
    enable_prefix_caching: bool = True
    # None: sized for the device (engine.config.default_scheduler_config)
    scheduler: SchedulerConfig | None = None
    seed: int = 0  # seeds dummy weights and the shared sampling generator
    cuda_graphs: bool = True  # capture decode steps in CUDA graphs (CUDA only)
    # Keep a GGUF's converted weights and metadata in the cache folder for fast reloads
    # (engine.loader.converted; $TANDEM_CACHE_DIR). Costs the weights' size on disk.
    converted_cache: bool = True
    # Single-row projections (batch-1 decode steps) through the Triton GEMV instead of cuBLAS
    # (CUDA only; engine.kernels.gemv), and FP8 ones through the FP8 GEMV instead of
    # torch._scaled_mm (engine.kernels.fp8_gemv). Off: a row alone then sums in another order
    # than in a batch, so greedy outputs stop being bitwise batch-invariant (docs/benchmarks.md,
    # issues 19 and 20); bench.engine_gpu turns it on unless --no-gemv.
    triton_gemv: bool = False
    # FP8 weights on CUDA: quantize the projections' activations per token inside the RMSNorm
    # and SiLU-and-mul kernels that produce them (engine.kernels.rms_norm.rms_norm_fp8,
    # silu_and_mul.silu_and_mul_fp8) instead of a kernel of their own before each projection:
    # bitwise the same values, three launches fewer per layer (issue 20; measured on an H100 in
    # docs/benchmarks.md). None: on wherever it applies (CUDA, every decoder projection FP8
    # with dynamic per-token activation scales), else off; True: required (ValueError where it
    # does not apply); False: off.
    fused_fp8_quant: bool | None = None
    # "fp8": e4m3 W8A8 decoder projections, quantized at load (an FP8 checkpoint is FP8 anyway)
    quantization: str | None = None
    # How quantization="fp8" rounds a bf16/fp32 model's weights to e4m3: None, each to the
    # nearest value; "gptq", column by column with each rounding error compensated on the
    # columns not yet rounded, under the Hessian of the layer's inputs on the calibration text
    # (engine.fp8_gptq): the same FP8 format and kernels, a fraction of the perplexity cost
    # (docs/benchmarks.md), a few seconds per layer more at load. Tensor-parallel size 1 only.
    fp8_weight_calibration: str | None = None
    kv_cache_dtype: str = "auto"  # "auto": the model dtype; "fp8": e4m3 with scales (kv_quant)
    # An FP8 cache's scales: "per_head", one per (layer, K|V, kv head), calibrated at start-up
    # (half a bf16 cache exactly); "per_token", one per (token, kv head) inside each block
    # (no calibration, 3% larger at head_dim 128). Ignored without kv_cache_dtype="fp8".
    kv_cache_scales: str = "per_head"
    # A per-head scale table to load instead of calibrating (engine.kv_calibration.save_kv_scales,
    # `tandem calibrate-kv`): every worker that loads one file holds the same scales, whatever
    # its tensor-parallel size
    kv_cache_scales_path: str | None = None
    # Ranks of one engine (engine.parallel): 1 runs in this process alone, N > 1 starts N - 1
    # more processes that hold a shard of every layer each; this one schedules and samples.
    tensor_parallel_size: int = 1
    # How long a rank waits for the others in a collective before the engine fails (RankFailed)
    tensor_parallel_timeout_s: float = 60.0
    # CPU ranks that split the KV heads map one KV cache (/dev/shm): KV transfer reads and
    # writes every head there. False: each rank holds its own heads, as GPU ranks always do
    # (and CPU ranks whose KV heads are replicated); a transfer then gathers the shipped blocks
    # to rank 0, or scatters the landed ones from it, over the compute group (engine.parallel).
    tensor_parallel_shared_kv: bool = True
    # For testing on one GPU only: every rank on the same CUDA device, the forward's
    # collectives over gloo (it copies CUDA tensors through the host) instead of NCCL, which
    # refuses two ranks on one GPU. Slow; gloo collectives cannot be captured, so it needs
    # cuda_graphs=False. tests/gpu/test_tensor_parallel_gpu.py runs the sharded Triton path so.
    tensor_parallel_one_device: bool = False
    # This engine ships or receives KV (a disaggregated pool's worker; cluster.service sets it
    # there). Only private-KV tensor parallelism pays for it: rank 0 keeps a bounded staging
    # region of whole-head blocks beside its own cache (kv_staging_blocks). False:
    # such an engine keeps no staging region and refuses keep_kv, prefill_only and
    # transferred requests (InvalidRequest); TP=1 and shared CPU caches transfer either way.
    kv_transfer: bool = False
    # Private-KV tensor parallelism with kv_transfer only: the whole-head blocks of rank 0's
    # transfer staging region (engine.transfer_region), taken from rank 0's KV budget. A
    # shipped prompt's KV is gathered there from every rank, a landed one waits there for its
    # scatter. It must hold one max_model_len sequence (checked at start-up); None: that plus
    # one step's prompt tokens (max_num_batched_tokens), so a step's finished prompts stage
    # while a longest one ships. Other engines keep no staging region and ignore it.
    kv_staging_blocks: int | None = None
    # Steps that decode stay under this (prefill chunks sized by the measured step time,
    # engine.scheduler); sets the scheduler's target_step_s. None: the fixed token budget.
    target_itl_s: float | None = None
    # Launch each step before turning the previous one's tokens into text and outputs
    # (Engine.step, docs/architecture.md): the host's detokenization, stop-string holds and
    # RequestOutputs run while the GPU computes the next step. Every finish decision is still
    # made before the next step is scheduled. The step in flight is never discarded: a request
    # added or KV attached between two step() calls joins the step after it (one step later
    # than synchronously); an abort or export of a request in it waits for the device, and
    # the step's result for that request is dropped. Rank 0 of a tensor-parallel engine, and
    # a step whose schedule could preempt, step synchronously either way. None (the default):
    # on where the device runs asynchronously to the host (CUDA), off on the CPU, where a
    # step is computed before launch returns and there is nothing to overlap.
    overlap_outputs: bool | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r} must be one of {DEVICES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {DTYPES}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={self.quantization!r} must be one of {QUANTIZATIONS}")
        if self.fp8_weight_calibration not in FP8_WEIGHT_CALIBRATIONS:
            raise ValueError(
                f"fp8_weight_calibration={self.fp8_weight_calibration!r} must be one of "
                f"{FP8_WEIGHT_CALIBRATIONS}"
            )
        if self.fp8_weight_calibration is not None and self.quantization != "fp8":
            raise ValueError(
                f"fp8_weight_calibration={self.fp8_weight_calibration!r} rounds FP8 weights: it "
                f"needs quantization='fp8', got {self.quantization!r}"
            )
        if self.fp8_weight_calibration is not None and self.tensor_parallel_size != 1:
            raise ValueError(
                f"fp8_weight_calibration={self.fp8_weight_calibration!r} runs at "
                f"tensor_parallel_size=1 only, got {self.tensor_parallel_size}"
            )
        if self.fused_fp8_quant is True and self.quantization != "fp8":
            raise ValueError(
                f"fused_fp8_quant=True needs quantization='fp8', got {self.quantization!r}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} must be one of {KV_CACHE_DTYPES}"
            )
        if self.kv_cache_scales not in KV_CACHE_SCALES:
            raise ValueError(
                f"kv_cache_scales={self.kv_cache_scales!r} must be one of {KV_CACHE_SCALES}"
            )
        if self.kv_cache_scales_path is not None and (
            self.kv_cache_dtype != "fp8" or self.kv_cache_scales != "per_head"
        ):
            raise ValueError(
                "kv_cache_scales_path is a per-head FP8 scale table: it needs "
                f"kv_cache_dtype='fp8' and kv_cache_scales='per_head', got "
                f"{self.kv_cache_dtype!r} and {self.kv_cache_scales!r}"
            )
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a power of two")
        for name in ("num_kv_blocks", "kv_cache_bytes", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} must be >= 1")
        if not self.tensor_parallel_timeout_s > 0:
            raise ValueError(
                f"tensor_parallel_timeout_s={self.tensor_parallel_timeout_s} must be > 0"
            )
        if type(self.tensor_parallel_shared_kv) is not bool:
            raise ValueError(
                f"tensor_parallel_shared_kv={self.tensor_parallel_shared_kv!r} must be a bool"
            )
        if type(self.tensor_parallel_one_device) is not bool:
            raise ValueError(
                f"tensor_parallel_one_device={self.tensor_parallel_one_device!r} must be a bool"
            )
        if self.tensor_parallel_one_device and self.cuda_graphs:
            raise ValueError(
                "tensor_parallel_one_device=True needs cuda_graphs=False (its gloo collectives "
                "cannot be captured in a CUDA graph)"
            )
        if self.kv_staging_blocks is not None and (
            type(self.kv_staging_blocks) is not int or self.kv_staging_blocks < 1
        ):
            raise ValueError(f"kv_staging_blocks={self.kv_staging_blocks!r} must be an int >= 1")
        if type(self.kv_transfer) is not bool:
            raise ValueError(f"kv_transfer={self.kv_transfer!r} must be a bool")
        if self.overlap_outputs is not None and type(self.overlap_outputs) is not bool:
            raise ValueError(f"overlap_outputs={self.overlap_outputs!r} must be a bool or None")
        if self.target_itl_s is not None and not self.target_itl_s > 0:
            raise ValueError(f"target_itl_s={self.target_itl_s!r} must be > 0 seconds or None")
        if not 0.0 < self.kv_cache_memory_fraction < 1.0:
            raise ValueError(
                f"kv_cache_memory_fraction={self.kv_cache_memory_fraction} must be in (0, 1)"
            )


# GPU scheduler defaults (issue 19): the saturation benchmark's Llama-3-8B runs on an H100 reach
# their best throughput at 256 running sequences and 8,192 tokens a step; cards under 40 GiB
# hold about half the KV cache, so half of each.
GPU_LARGE_MEMORY_BYTES = 40 << 30


def default_scheduler_config(device_type: str, total_memory_bytes: int = 0) -> SchedulerConfig:
    """Scheduler limits for a device: SchedulerConfig's own (CPU-sized) defaults on CPU;
    sized from the card's memory on a GPU."""
    if device_type != "cuda":
        return SchedulerConfig()
    if total_memory_bytes >= GPU_LARGE_MEMORY_BYTES:
        return SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192)
    return SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=4096)

"""Tandem's engine on one GPU against Hugging Face transformers, same shape, same run.

Dummy bf16 weights of a named shape, random prompts, greedy decoding that never stops early:
decode tokens/s by batch size (and batch-1 memory bandwidth), TTFT of one long prompt, and the
same with transformers (eager; static cache, compiled, at batch 1). `--saturation-requests`
adds bench.engine_saturation's rows; `--no-gemv`, `--pdl`, `--dense-prefill`,
`--pinned-inputs` flip the engine's switches. `--tensor-parallel-size N` adds Tandem at N ranks
(one GPU each, NCCL) beside TP=1, same run. How each number is timed: docs/benchmarks.md.

    python -m bench.engine_gpu --shape llama-3-8b [--batch-sizes 1,16,64] [--out results.json]
        [--tensor-parallel-size 2]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.common import machine_info, markdown_table, write_json
from contracts.errors import TensorParallelShapeError
from contracts.sampling_params import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.model_config import NAMED_SHAPES, ModelConfig
from engine.scheduler import SchedulerConfig
from engine.sharding import check_divisible


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-8b", choices=sorted(NAMED_SHAPES))
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ttft-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baselines", default="eager,static", help="comma list, or 'none'")
    parser.add_argument("--kv-cache-gb", type=float, default=16.0)
    parser.add_argument(
        "--peak-bandwidth",
        type=float,
        default=3.0e12,
        help="bytes/s; 3.0e12 was measured on the lent H100s",
    )
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--no-gemv", action="store_true", help="cuBLAS for 1-row projections")
    parser.add_argument("--pdl", action="store_true", help="GEMV with dependent launch")
    parser.add_argument(
        "--dense-prefill", action="store_true", help="fresh prefills through torch's SDPA"
    )
    parser.add_argument(
        "--pinned-inputs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode graphs fed from pinned buffers (the engine's default)",
    )
    parser.add_argument(
        "--saturation-requests",
        type=int,
        default=0,
        help="also run bench.engine_saturation's workload (1,024 in / 128 out, 256 running, "
        "8,192 tokens a step) with this many requests (0: skip)",
    )
    parser.add_argument("--saturation-repeats", type=int, default=2, help="median of this many")
    parser.add_argument(
        "--profile", action="store_true", help="print a torch.profiler table of one TTFT prefill"
    )
    parser.add_argument("--trace", help="with --profile: write its Chrome trace here (.json.gz)")
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="N > 1: also Tandem at N ranks (GPUs 0..N-1, NCCL); TP=1 stays the baseline column "
        "(saturation and --profile run at TP=1 only)",
    )
    parser.add_argument("--out", default="bench/results/engine_gpu.json")
    return parser.parse_args(argv)


def tandem_sizes(args: argparse.Namespace, visible_gpus: int) -> list[int]:
    """The tensor-parallel sizes to run, baseline first: [1] or [1, N]. Raises ValueError
    naming the problem when N is < 1 or above the visible GPUs, TensorParallelShapeError when N
    does not split the shape."""
    size = args.tensor_parallel_size
    if size < 1:
        raise ValueError(f"--tensor-parallel-size={size} must be >= 1")
    if size > visible_gpus:
        raise ValueError(
            f"--tensor-parallel-size={size} needs {size} GPUs (one per rank); "
            f"{visible_gpus} visible (CUDA_VISIBLE_DEVICES)"
        )
    if size == 1:
        return [1]
    check_divisible(NAMED_SHAPES[args.shape], size)  # TensorParallelShapeError names the sizes
    return [1, size]


def system_name(tp_size: int) -> str:
    return "tandem" if tp_size == 1 else f"tandem-tp{tp_size}"


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size) for _ in range(length)] for _ in range(num)]


def median_of(runs: int, measure: Callable[[int], float]) -> dict[str, Any]:
    measure(-1)  # warm-up
    values = [measure(i) for i in range(runs)]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": values,
    }


# ---- Tandem ------------------------------------------------------------------------------


def dummy_engine(
    shape: str,
    kv_cache_gb: float,
    max_model_len: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    cuda_graphs: bool = True,
    triton_gemv: bool = True,
    tensor_parallel_size: int = 1,
    **options: Any,
) -> Engine:
    """Tandem on the current GPU with dummy bf16 weights of a named shape (at
    `tensor_parallel_size` N > 1 on GPUs 0..N-1: close it); `options` are further EngineConfig
    fields (quantization, kv_cache_dtype, ...)."""
    return Engine(
        EngineConfig(
            model=f"dummy:{shape}",
            device="cuda",
            dtype="bfloat16",
            kv_cache_bytes=int(kv_cache_gb * 2**30),
            max_model_len=max_model_len,
            cuda_graphs=cuda_graphs,
            triton_gemv=triton_gemv,
            tensor_parallel_size=tensor_parallel_size,
            **options,
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
            ),
        )
    )


def tandem_engine(args: argparse.Namespace, max_batch: int, tp_size: int = 1) -> Engine:
    import engine.cuda_graph as cuda_graph
    import engine.kernels.gemv as gemv_module
    import engine.triton_attention as triton_attention

    cuda_graph.PINNED_INPUTS = args.pinned_inputs
    gemv_module.USE_PDL = args.pdl
    triton_attention.DENSE_FRESH_PREFILL = True if args.dense_prefill else None
    return dummy_engine(
        args.shape, args.kv_cache_gb, max_model_len=4096, max_num_seqs=max_batch,
        max_num_batched_tokens=max(args.ttft_len, 4096), cuda_graphs=not args.no_cuda_graphs,
        triton_gemv=not args.no_gemv, tensor_parallel_size=tp_size,
    )  # fmt: skip


def tandem_decode(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(decode tokens/s after every first token, end-to-end output tokens/s)."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    engine.block_manager.reset_prefix_cache()
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"d{i}", None, params, prompt_token_ids=prompt)
    seen: set[str] = set()
    counts: dict[str, int] = {}
    first_all = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen.add(output.request_id)
            counts[output.request_id] = counts.get(output.request_id, 0) + 1
        if first_all is None and len(seen) == len(prompts):
            torch.cuda.synchronize()
            first_all = time.perf_counter()
    torch.cuda.synchronize()
    ended = time.perf_counter()
    assert all(n == new_tokens for n in counts.values()), "a request stopped early"
    assert first_all is not None
    num = len(prompts)
    return num * (new_tokens - 1) / (ended - first_all), num * new_tokens / (ended - started)


def tandem_ttft(engine: Engine, prompt: list[int]) -> float:
    engine.block_manager.reset_prefix_cache()
    torch.cuda.synchronize()
    started = time.perf_counter()
    engine.add_request("ttft", None, SamplingParams(max_tokens=1), prompt_token_ids=prompt)
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - started


def bytes_per_decode_step(config: ModelConfig, context_len: int, dtype_bytes: int = 2) -> int:
    weights = config.num_parameters() - config.vocab_size * config.hidden_size  # no embedding
    if config.tie_word_embeddings:  # the LM head is the embedding matrix: read in full
        weights += config.vocab_size * config.hidden_size
    return weights * dtype_bytes + context_len * config.kv_bytes_per_token(dtype_bytes)


def run_tandem(args: argparse.Namespace, batch_sizes: list[int], tp_size: int) -> dict[str, Any]:
    started = time.perf_counter()
    with tandem_engine(args, max(batch_sizes), tp_size) as engine:
        load_s = time.perf_counter() - started
        result = measure_tandem(args, engine, batch_sizes, is_baseline=tp_size == 1)
    result |= {"load_s": load_s, "tensor_parallel_size": tp_size}
    # `with` leaves the name bound: without this the saturation engine (40 GiB of KV) was
    # built beside this one and ran out of memory on an H100 (2026-12-07)
    del engine
    gc.collect()  # the engine's weights and KV cache go before the next system loads
    torch.cuda.empty_cache()
    if args.saturation_requests and tp_size == 1:
        result["saturation"] = run_saturation(args)
    return result


def measure_tandem(
    args: argparse.Namespace, engine: Engine, batch_sizes: list[int], is_baseline: bool
) -> dict[str, Any]:
    """Decode tok/s by batch size and the TTFT of one long prompt (and the profile, on the
    baseline engine)."""
    result: dict[str, Any] = {"decode": {}}
    vocab = engine.model_config.vocab_size
    for batch in batch_sizes:
        end_to_end: list[float] = []

        def measure(rep: int, batch: int = batch, sink: list[float] = end_to_end) -> float:
            prompts = random_prompts(batch, args.prompt_len, vocab, seed=1000 * batch + rep)
            rate, e2e = tandem_decode(engine, prompts, args.new_tokens)
            sink.append(e2e)
            return rate

        stats = median_of(args.repeats, measure)
        stats["end_to_end_median"] = statistics.median(end_to_end[1:])
        result["decode"][batch] = stats
    ttft_prompt = random_prompts(1, args.ttft_len, vocab, seed=7)[0]
    result["ttft_s"] = median_of(args.repeats, lambda rep: tandem_ttft(engine, ttft_prompt))
    if args.profile and is_baseline:
        profile_ttft(engine, ttft_prompt, args.trace)
    engine.check_integrity()
    return result


def run_saturation(args: argparse.Namespace) -> dict[str, Any]:
    """bench.engine_saturation's workload and bound, in this run."""
    from bench import engine_saturation
    from bench.engine_variants import Variant

    sat_args = engine_saturation.parse_args(
        [f"--num-requests={args.saturation_requests}", f"--repeats={args.saturation_repeats}"]
    )
    sat_args.shape = args.shape
    config = NAMED_SHAPES[args.shape]
    variant = Variant(
        name="bf16", quantization=None, kv_cache_dtype="auto", triton_gemv=not args.no_gemv,
        pdl=args.pdl, dense_prefill=True if args.dense_prefill else None,
    )  # fmt: skip
    runs = engine_saturation.run_variant(sat_args, variant)
    bound = engine_saturation.request_bound_s(sat_args, config)
    rates = [r["output_tok_s"] for r in runs]
    return {
        "runs": runs,
        "median_output_tok_s": statistics.median(rates),
        "bound_output_tok_s": sat_args.output_len / bound["bound_s"],
    }


def profile_ttft(engine: Engine, prompt: list[int], trace_path: str | None) -> None:
    """GPU time per kernel of one TTFT prefill, and the host-side total, printed; the whole
    timeline (host gaps included) to `trace_path` if given."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        seconds = tandem_ttft(engine, prompt)
    print(f"\nprofiled TTFT: {1000 * seconds:.1f} ms wall")
    if trace_path:
        prof.export_chrome_trace(trace_path)
    print(
        prof.key_averages().table(
            sort_by="self_device_time_total", row_limit=20, max_name_column_width=60
        )
    )


# ---- transformers ------------------------------------------------------------------------


def hf_model(config: ModelConfig) -> Any:
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def hf_generate(model: Any, prompts: list[list[int]], new_tokens: int, **kwargs: Any) -> float:
    ids = torch.tensor(prompts, device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            **kwargs,
        )
    torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new_tokens, "transformers stopped early"
    return time.perf_counter() - started


def hf_decode(model: Any, prompts: list[list[int]], new_tokens: int, **kwargs: Any) -> float:
    """Decode tokens/s: generate N tokens minus the time of generating 1 (the prefill)."""
    prefill_s = hf_generate(model, prompts, 1, **kwargs)
    total_s = hf_generate(model, prompts, new_tokens, **kwargs)
    return len(prompts) * (new_tokens - 1) / (total_s - prefill_s)


def run_transformers(
    args: argparse.Namespace, config: ModelConfig, batch_sizes: list[int], mode: str
) -> dict[str, Any]:
    model = hf_model(config)
    kwargs: dict[str, Any] = {}
    if mode == "static":
        # transformers compiles the forward itself when generating with a static cache;
        # wrapping it in torch.compile(mode="reduce-overhead") as well breaks its CUDA graphs
        # (the cache's index_copy_ overwrites graph outputs; seen on H200, torch 2.11).
        kwargs["cache_implementation"] = "static"
        batch_sizes = batch_sizes[:1]
    result: dict[str, Any] = {"decode": {}}
    for batch in batch_sizes:
        result["decode"][batch] = median_of(
            args.repeats,
            lambda rep, b=batch: hf_decode(
                model,
                random_prompts(b, args.prompt_len, config.vocab_size, 2000 * b + rep),
                args.new_tokens,
                **kwargs,
            ),
        )
    ttft_prompt = random_prompts(1, args.ttft_len, config.vocab_size, seed=7)
    result["ttft_s"] = median_of(
        args.repeats, lambda rep: hf_generate(model, ttft_prompt, 1, **kwargs)
    )
    return result


# ---- report ------------------------------------------------------------------------------


def report(
    args: argparse.Namespace, config: ModelConfig, results: dict[str, Any], batch_sizes: list[int]
) -> str:
    systems = list(results)
    rows = []
    for batch in batch_sizes:
        row = [f"decode tok/s, batch {batch}"]
        for name in systems:
            stats = results[name]["decode"].get(batch)
            row.append("-" if stats is None else f"{stats['median']:,.1f}")
        rows.append(row)
    context = args.prompt_len + args.new_tokens // 2
    step_bytes = bytes_per_decode_step(config, context)
    row = ["batch 1: % of peak bandwidth (of every GPU it runs on)"]
    for name in systems:
        stats = results[name]["decode"].get(1)
        peak = args.peak_bandwidth * results[name].get("tensor_parallel_size", 1)
        row.append("-" if stats is None else f"{100 * stats['median'] * step_bytes / peak:.0f}%")
    rows.append(row)
    rows.append(
        [f"TTFT, {args.ttft_len}-token prompt (ms)"]
        + [f"{1000 * results[n]['ttft_s']['median']:.1f}" for n in systems]
    )
    rows += speedup_rows(results, batch_sizes)
    if args.saturation_requests:
        row = [f"saturation output tok/s ({args.saturation_requests} x 1,024 in / 128 out)"]
        for name in systems:
            sat = results[name].get("saturation")
            row.append(
                "-"
                if sat is None
                else f"{sat['median_output_tok_s']:,.0f} "
                f"({100 * sat['median_output_tok_s'] / sat['bound_output_tok_s']:.0f}% of bound)"
            )
        rows.append(row)
    return markdown_table(["metric", *systems], rows)


def speedup_rows(results: dict[str, Any], batch_sizes: list[int]) -> list[list[str]]:
    """Tandem at TP=N over Tandem at TP=1, in the TP=N column: decode tok/s at each batch
    size and TTFT (TP=1's time over TP=N's). None without a TP=N run."""
    systems = list(results)
    tp_names = [n for n in systems if results[n].get("tensor_parallel_size", 1) > 1]
    if not tp_names or "tandem" not in results:
        return []
    base, rows = results["tandem"], []
    for batch in batch_sizes:
        row = [f"speed-up over TP=1, decode batch {batch}"]
        for name in systems:
            ratio = results[name]["decode"][batch]["median"] / base["decode"][batch]["median"]
            row.append(f"{ratio:.2f}x" if name in tp_names else "-")
        rows.append(row)
    row = ["speed-up over TP=1, TTFT"]
    for name in systems:
        ratio = base["ttft_s"]["median"] / results[name]["ttft_s"]["median"]
        row.append(f"{ratio:.2f}x" if name in tp_names else "-")
    return [*rows, row]


def main() -> None:
    args = parse_args()
    config = NAMED_SHAPES[args.shape]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    baselines = [] if args.baselines == "none" else args.baselines.split(",")
    try:
        sizes = tandem_sizes(args, torch.cuda.device_count())  # refused before anything loads
    except (ValueError, TensorParallelShapeError) as e:
        raise SystemExit(f"bench.engine_gpu: {e}") from e
    results: dict[str, Any] = {system_name(n): run_tandem(args, batch_sizes, n) for n in sizes}
    for mode in baselines:
        gc.collect()  # the previous system's weights and KV cache go before the next loads
        torch.cuda.empty_cache()
        results[f"transformers-{mode}"] = run_transformers(args, config, batch_sizes, mode)
    table = report(args, config, results, batch_sizes)
    device = torch.cuda.get_device_name()
    devices = [torch.cuda.get_device_name(i) for i in range(max(sizes))]
    print(
        f"\n{args.shape}, bf16, {device}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, median of {args.repeats}, "
        f"tensor parallel {' vs '.join(map(str, sizes))} on {len(devices)} x {device}\n{table}"
    )
    write_json(
        args.out,
        {
            "config": vars(args),
            "machine": machine_info(),
            "device": device,
            "tensor_parallel_size": args.tensor_parallel_size,
            "devices": devices,
            "results": results,
            "table": table,
        },
    )


if __name__ == "__main__":
    main()

"""The engine's throughput at saturation on one GPU (Llama-3-8B shape, dummy bf16 weights, all
requests submitted at once), as a share of the physical bound (the larger of FLOPs / peak and
bytes / peak bandwidth per request, summed), with transformers `generate` as the baseline in the
same run. How the bound is computed: docs/benchmarks.md. `--variants` (bench.engine_variants,
e.g. `bf16,w8+gemv+fusedq`) runs several engines one after another, same prompts; the bound
stays bf16's.

    python -m bench.engine_saturation [--variants bf16] [--num-requests 512] [--max-num-seqs 256]
        [--out F]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import torch

from bench.common import machine_info, markdown_table, write_json
from bench.engine_gpu import hf_generate, hf_model, random_prompts
from bench.engine_variants import Variant, apply_switches, parse_variant
from contracts.sampling_params import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.model_config import NAMED_SHAPES, ModelConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-8b", choices=sorted(NAMED_SHAPES))
    parser.add_argument("--variants", default="bf16", help="bench.engine_variants names, comma")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--kv-cache-gb", type=float, default=40.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline-batch", type=int, default=64, help="0: no baseline")
    parser.add_argument("--peak-flops", type=float, default=790e12, help="bf16 matmul, FLOP/s")
    parser.add_argument("--peak-bandwidth", type=float, default=3.0e12, help="bytes/s")
    parser.add_argument("--out", default="bench/results/engine_saturation.json")
    return parser.parse_args(argv)


def request_bound_s(args: argparse.Namespace, config: ModelConfig) -> dict[str, float]:
    """The least GPU time one request can take: compute and memory, each at its peak."""
    matmul_params = config.num_parameters() - config.vocab_size * config.hidden_size
    if config.tie_word_embeddings:  # the LM head is the embedding matrix
        matmul_params += config.vocab_size * config.hidden_size
    total = args.input_len + args.output_len
    # attention: QK^T and PV, 2 FLOPs per multiply-add, over the causal context of each token
    attention_per_context = 4 * config.num_layers * config.num_heads * config.head_dim
    flops = 2 * matmul_params * total + attention_per_context * total * (total + 1) / 2
    kv_per_token = config.kv_bytes_per_token(2)
    # each decode step reads the request's context KV, plus its share of the weights
    context_reads = sum(args.input_len + i for i in range(args.output_len - 1)) * kv_per_token
    weight_reads = (args.output_len - 1) * 2 * matmul_params / args.max_num_seqs
    compute_s = flops / args.peak_flops
    memory_s = (context_reads + weight_reads) / args.peak_bandwidth
    return {"compute_s": compute_s, "memory_s": memory_s, "bound_s": max(compute_s, memory_s)}


def tandem_engine(args: argparse.Namespace, variant: Variant) -> Engine:
    from engine.scheduler import SchedulerConfig

    apply_switches(variant)
    return Engine(
        EngineConfig(
            model=f"dummy:{args.shape}", device="cuda", dtype="bfloat16",
            kv_cache_bytes=int(args.kv_cache_gb * 2**30),
            max_model_len=args.input_len + args.output_len,
            scheduler=SchedulerConfig(
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
            ),
            **variant.engine_options(),  # type: ignore[arg-type]
        )
    )  # fmt: skip


def saturate(engine: Engine, prompts: list[list[int]], output_len: int) -> dict[str, float]:
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    engine.block_manager.reset_prefix_cache()  # random prompts, but never a warm cache
    torch.cuda.synchronize()
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"s{i}", None, params, prompt_token_ids=prompt)
    generated = 0
    steps = 0
    preempted = engine.scheduler.num_preemptions
    while engine.has_unfinished_requests():
        generated += len(engine.step())
        steps += 1
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if generated != len(prompts) * output_len:
        raise RuntimeError(f"{generated} tokens generated, {len(prompts) * output_len} expected")
    return {
        "seconds": seconds,
        "steps": steps,
        "preemptions": engine.scheduler.num_preemptions - preempted,
        "output_tok_s": generated / seconds,
    }


def baseline(args: argparse.Namespace, config: ModelConfig) -> dict[str, float]:
    model = hf_model(config)
    prompts = random_prompts(args.baseline_batch, args.input_len, config.vocab_size, seed=99)
    hf_generate(model, prompts[:2], 4)  # warm-up
    seconds = hf_generate(model, prompts, args.output_len)
    return {"seconds": seconds, "output_tok_s": len(prompts) * args.output_len / seconds}


def run_variant(args: argparse.Namespace, variant: Variant) -> list[dict[str, float]]:
    """Warm-up on a quarter of the requests, then `--repeats` timed runs."""
    engine = tandem_engine(args, variant)
    vocab = engine.model_config.vocab_size
    saturate(engine, random_prompts(args.num_requests // 4, args.input_len, vocab, 1), 16)
    runs = [
        saturate(
            engine,
            random_prompts(args.num_requests, args.input_len, vocab, 10 + rep),
            args.output_len,
        )
        for rep in range(args.repeats)
    ]
    engine.check_integrity()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return runs


def main() -> None:
    args = parse_args()
    config = NAMED_SHAPES[args.shape]
    try:
        variants = [parse_variant(name) for name in args.variants.split(",")]
    except ValueError as error:
        raise SystemExit(str(error)) from None
    bound = request_bound_s(args, config)
    bound_tok_s = args.output_len / bound["bound_s"]
    total_per_output = (args.input_len + args.output_len) / args.output_len
    result: dict[str, Any] = {"bound": bound, "bound_output_tok_s": bound_tok_s, "variants": {}}
    rows = []
    for variant in variants:
        runs = run_variant(args, variant)
        rates = [run["output_tok_s"] for run in runs]
        tandem = statistics.median(rates)
        result["variants"][variant.name] = runs
        print(variant.name, [round(r) for r in rates], "steps", [r["steps"] for r in runs],
              "preemptions", [r["preemptions"] for r in runs], flush=True)  # fmt: skip
        rows.append([f"Tandem {variant.name}, saturated",
                     f"{tandem:,.0f} ({min(rates):,.0f}-{max(rates):,.0f})",
                     f"{tandem * total_per_output:,.0f}",
                     f"{100 * tandem / bound_tok_s:.0f}%"])  # fmt: skip
    result["tandem"] = result["variants"][variants[0].name]
    if args.baseline_batch:
        hf = baseline(args, config)
        result["transformers"] = hf
        rows.append([f"transformers eager, batch {args.baseline_batch}",
                     f"{hf['output_tok_s']:,.0f}", f"{hf['output_tok_s'] * total_per_output:,.0f}",
                     f"{100 * hf['output_tok_s'] / bound_tok_s:.0f}%"])  # fmt: skip
    rows.append(["bound (bf16)", f"{bound_tok_s:,.0f}", f"{bound_tok_s * total_per_output:,.0f}",
                 "100%"])  # fmt: skip
    table = markdown_table(["system", "output tok/s", "total tok/s", "% of bound"], rows)
    device = torch.cuda.get_device_name()
    print(
        f"\n{args.shape}, {device}, {args.num_requests} requests of {args.input_len} in / "
        f"{args.output_len} out, max {args.max_num_seqs} running, median of {args.repeats}\n"
        f"bound per request: compute {1000 * bound['compute_s']:.1f} ms, memory "
        f"{1000 * bound['memory_s']:.1f} ms\n{table}"
    )
    write_json(args.out, {"config": vars(args), "machine": machine_info(), "device": device,
                          "results": result, "table": table})  # fmt: skip


if __name__ == "__main__":
    main()

"""A/B of the engine's decode switches on one GPU, interleaved in one process (A B A B ...).

One engine (dummy weights of a named shape) is built once; before each round the chosen
variant's switches are set and the decode CUDA graphs captured again, then decode tokens/s is
timed at each batch size (bench.engine_gpu's `tandem_decode`). Interleaving the variants on the
same engine keeps clock and memory drift out of the comparison. Variants: `base` (defaults),
`pinned` (engine.cuda_graph.PINNED_INPUTS), `gemv` (the Triton GEMV for one-row projections),
`pdl` (the GEMV with programmatic dependent launch), `overlap` (EngineConfig.overlap_outputs:
the next step launched before this one's outputs are made; the engine's default on CUDA, but
here a variant without `overlap` steps synchronously), or several joined by `+`.

    python -m bench.engine_ab [--variants base,pinned] [--batch-sizes 1,64] [--rounds 2]
    python -m bench.engine_ab --variants pinned,pinned+overlap --batch-sizes 1,64
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from typing import Any

import torch

import engine.cuda_graph as cuda_graph
import engine.kernels.gemv as gemv_module
from bench.common import machine_info, markdown_table, write_json
from bench.engine_gpu import dummy_engine, random_prompts, tandem_decode
from engine.engine import Engine

SWITCHES = ("pinned", "gemv", "pdl", "overlap")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--variants", default="base,pinned", help="comma list; switches by '+'")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--rounds", type=int, default=2, help="times each variant is timed")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-gb", type=float, default=16.0)
    parser.add_argument("--out", default="bench/results/engine_ab.json")
    return parser.parse_args()


def switches(variant: str) -> set[str]:
    names = set(variant.split("+")) - {"base"}
    unknown = names - set(SWITCHES)
    if unknown:
        raise SystemExit(f"unknown switch(es) {sorted(unknown)}; known: base, {SWITCHES}")
    return names


def apply(engine: Engine, variant: str, max_batch: int) -> None:
    on = switches(variant)
    cuda_graph.PINNED_INPUTS = "pinned" in on
    gemv_module.USE_PDL = "pdl" in on
    engine.model.use_triton_gemv("gemv" in on or "pdl" in on)
    # the engine reads the switch at every step (an idle engine: nothing is in flight)
    engine.config = dataclasses.replace(engine.config, overlap_outputs="overlap" in on)
    engine.runner.capture_cuda_graphs(max_batch, engine.max_model_len)


def main() -> None:
    args = parse_args()
    variants = args.variants.split(",")
    for v in variants:
        switches(v)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    max_batch = max(batch_sizes)
    engine = dummy_engine(
        args.shape, args.kv_cache_gb, max_model_len=4096, max_num_seqs=max_batch,
        max_num_batched_tokens=4096, cuda_graphs=False, triton_gemv=False,
    )  # fmt: skip
    vocab = engine.model_config.vocab_size
    values: dict[str, dict[int, list[float]]] = {v: {b: [] for b in batch_sizes} for v in variants}
    for round_ in range(-1, args.rounds):  # round -1 warms every variant up, untimed
        for variant in variants:
            apply(engine, variant, max_batch)
            for batch in batch_sizes:
                prompts = random_prompts(batch, args.prompt_len, vocab, seed=1000 * batch + round_)
                rate, _ = tandem_decode(engine, prompts, args.new_tokens)
                if round_ >= 0:
                    values[variant][batch].append(rate)
                    print(f"round {round_} {variant} batch {batch}: {rate:.1f} tok/s", flush=True)
    engine.check_integrity()
    base = variants[0]
    rows = []
    for variant in variants:
        for batch in batch_sizes:
            med = statistics.median(values[variant][batch])
            ratio = med / statistics.median(values[base][batch])
            spread = ", ".join(f"{x:.1f}" for x in values[variant][batch])
            rows.append((variant, str(batch), f"{med:.1f}", f"{ratio:.3f}x", spread))
    print(f"{torch.cuda.get_device_name()}, shape {args.shape}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, rounds interleaved")  # fmt: skip
    print(
        markdown_table(["variant", "batch", "decode tok/s (median)", f"vs {base}", "rounds"], rows)
    )
    data: dict[str, Any] = {"args": vars(args), "values": values}
    data["machine"] = machine_info(("torch", "triton"))
    print(f"wrote {write_json(args.out, data)}")


if __name__ == "__main__":
    main()

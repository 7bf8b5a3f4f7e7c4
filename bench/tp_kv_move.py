"""What KV transfer costs inside a tensor-parallel worker whose ranks hold private KV (issue 24;
GPU ranks): the gather of a prompt's blocks to rank 0 before it ships (PLAN_GATHER_KV) and the
scatter of landed blocks to the ranks (PLAN_SCATTER_KV), next to the decode step they delay,
with a TP=1 decode step as the baseline, in the same run.

    python -m bench.tp_kv_move [--model dummy:llama-3-8b] [--device cuda] [--tp 2]
        [--prompt-tokens 2048] [--repeats 10] [--out tp_kv_move.json]

Issue 25 runs it on two H100s (NCCL); on the CPU (gloo) it only checks the script runs.
Each gather and scatter moves the prompt's blocks, every layer, every rank's heads.
"""

from __future__ import annotations

import argparse
import random
from typing import Any

from bench.common import Stats, machine_info, markdown_table, now, write_json
from contracts.sampling_params import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine, KeptKV
from engine.scheduler import SchedulerConfig


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="tp_kv_move.json")
    return parser.parse_args()


def build(args: argparse.Namespace, tp_size: int) -> Engine:
    blocks = 4 * (args.prompt_tokens // args.block_size + 2)
    return Engine(
        EngineConfig(
            model=args.model, device=args.device, tensor_parallel_size=tp_size,
            tensor_parallel_shared_kv=False, kv_transfer=True, num_kv_blocks=blocks,
            block_size=args.block_size,
            scheduler=SchedulerConfig(max_num_seqs=4,
                                      max_num_batched_tokens=max(args.prompt_tokens, 256)),
        )
    )  # fmt: skip


def decode_step_s(engine: Engine, args: argparse.Namespace, prompt: list[int]) -> Stats:
    """Seconds of one decode step of one sequence with the prompt's context."""
    params = SamplingParams(max_tokens=args.repeats + 3, temperature=0.0, ignore_eos=True)
    engine.add_request("decode", None, params, prompt_token_ids=prompt)
    engine.step()  # the prefill
    engine.step()  # warm-up
    times = []
    while engine.has_unfinished_requests():
        started = now()
        engine.step()
        times.append(now() - started)
    return Stats.of(times)


def move_s(engine: Engine, args: argparse.Namespace, prompt: list[int]) -> dict[str, Any]:
    """Seconds of a gather and of a scatter of the prompt's blocks (rank 0 waits for both)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.add_request("kept", None, params, prompt_token_ids=prompt, keep_kv=True)
    while engine.has_unfinished_requests():
        engine.step()
    kept = engine.take_kept_kv("kept")  # staged: the loop stepped until nothing waits
    assert isinstance(kept, KeptKV), kept
    ids, staged = list(kept.block_ids), list(kept.staging_ids)  # staging: rank 0's region
    gather, scatter = [], []
    for i in range(args.repeats + 1):
        started = now()
        engine._gather_transfer_kv(ids, staged)
        middle = now()
        engine._scatter_transfer_kv(ids, staged)
        if i:  # the first is a warm-up
            gather.append(middle - started)
            scatter.append(now() - middle)
    whole = engine.transfer_kv_cache
    nbytes = len(ids) * whole[:, :, 0].numel() * whole.element_size()
    engine.block_manager.release(kept.owner)
    return {"blocks": len(ids), "bytes": nbytes,
            "gather_s": Stats.of(gather), "scatter_s": Stats.of(scatter)}  # fmt: skip


def main() -> None:
    args = parse_args()
    prompt = [random.Random(0).randrange(1, 500) for _ in range(args.prompt_tokens)]
    with build(args, 1) as single:
        baseline = decode_step_s(single, args, prompt)
        device = str(single.device)
    with build(args, args.tp) as engine:
        step = decode_step_s(engine, args, prompt)
        moved = move_s(engine, args, prompt)
    rows = [
        ["decode step, TP=1 (baseline)", baseline.short(5)],
        [f"decode step, TP={args.tp}", step.short(5)],
        [f"gather of {moved['blocks']} blocks, {moved['bytes']} bytes", moved["gather_s"].short(5)],
        [f"scatter of {moved['blocks']} blocks", moved["scatter_s"].short(5)],
    ]
    print(f"{args.model} on {device}, TP={args.tp}, prompt {args.prompt_tokens} tokens")
    print(markdown_table(["what", "seconds: median (min-max)"], rows))
    results = {"decode_step_s_tp1": baseline, f"decode_step_s_tp{args.tp}": step, **moved}
    data = {"args": vars(args), "results": results, "machine": machine_info(("torch",))}
    print(f"wrote {write_json(args.out, data)}")


if __name__ == "__main__":
    main()

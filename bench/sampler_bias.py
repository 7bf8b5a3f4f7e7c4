"""What a request's logit bias and penalties cost the whole batch's sampling step (issue 16.3):
the former per-row code (a Python loop per bias entry, kept here as the baseline and as the
sampler test's reference) against engine.sampler.apply_bias_and_penalties, interleaved, on a
batch over the SmolLM2 vocabulary. CPU, fp32.

    python -m bench.sampler_bias [--rows 32] [--bias-entries 1024,49152] [--repeats 20]
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from pathlib import Path

import torch

from bench.common import Stats, machine_info, markdown_table, repeat_interleaved, write_json
from contracts.sampling_params import SamplingParams
from engine.sampler import LogitBias, SampleRow, apply_bias_and_penalties

VOCAB = 49152


def per_row_reference(logits: torch.Tensor, rows: list[SampleRow]) -> None:
    """The sampler's code before issue 16.3, row by row (in place)."""
    for i, row in enumerate(rows):
        params, line = row.params, logits[i]
        for token_id, bias in params.logit_bias:
            line[token_id] += bias
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)))
            values = line[seen]
            line[seen] = torch.where(
                values > 0, values / params.repetition_penalty, values * params.repetition_penalty
            )
        if (params.frequency_penalty or params.presence_penalty) and row.output_token_ids:
            counts = Counter(row.output_token_ids)
            ids = torch.tensor(list(counts))
            freq = torch.tensor(list(counts.values()), dtype=line.dtype)
            line[ids] -= params.frequency_penalty * freq + params.presence_penalty


def make_rows(num_rows: int, prompt_tokens: int, bias_entries: int) -> list[SampleRow]:
    rng = random.Random(0)
    rows = []
    for i in range(num_rows):
        bias = tuple((t, -1.0) for t in range(bias_entries)) if i == 0 else ()
        params = SamplingParams(repetition_penalty=1.1, logit_bias=bias)
        prompt = [rng.randrange(VOCAB) for _ in range(prompt_tokens)]
        output = [rng.randrange(VOCAB) for _ in range(64)]
        rows.append(SampleRow(params, prompt, output, None, LogitBias.of(params, "cpu")))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--bias-entries", default="0,1024,49152")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("bench/results/sampler_bias.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    logits = torch.randn(args.rows, VOCAB)
    results = []
    for entries in [int(x) for x in args.bias_entries.split(",")]:
        rows = make_rows(args.rows, args.prompt_tokens, entries)

        def timed(fn: object, rows: list[SampleRow] = rows) -> object:
            def run(_: int) -> float:
                copy = logits.clone()
                started = time.perf_counter()
                fn(copy, rows)  # type: ignore[operator]
                return (time.perf_counter() - started) * 1000

            return run

        ms = repeat_interleaved(
            {
                "per-row (before)": timed(per_row_reference),
                "batched": timed(apply_bias_and_penalties),
            },
            args.repeats,
        )
        for name, values in ms.items():
            results.append(
                {"bias_entries": entries, "code": name, "ms": Stats.of(values).as_dict()}
            )
    print(markdown_table(
        ["bias entries (one row)", "code", "ms per step, median", "min", "max"],
        [[str(r["bias_entries"]), r["code"], f"{r['ms']['median']:.2f}", f"{r['ms']['min']:.2f}",
          f"{r['ms']['max']:.2f}"] for r in results],
    ))  # fmt: skip
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path = write_json(
        args.out, {"settings": settings, "machine": machine_info(("torch",)), "results": results}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""bench.engine_gpu's plan and report on the CPU (the measurement needs a GPU): which
tensor-parallel sizes it runs, what it refuses before loading anything, and the TP=N columns."""

from __future__ import annotations

import pytest

from bench.engine_gpu import (
    bytes_per_decode_step,
    parse_args,
    report,
    speedup_rows,
    system_name,
    tandem_sizes,
)
from contracts.errors import TensorParallelShapeError
from engine.model_config import NAMED_SHAPES


def test_tp1_alone_by_default_and_tp1_as_the_baseline_of_tp_n() -> None:
    assert tandem_sizes(parse_args([]), visible_gpus=1) == [1]
    assert tandem_sizes(parse_args(["--tensor-parallel-size", "2"]), visible_gpus=2) == [1, 2]
    assert [system_name(n) for n in (1, 4)] == ["tandem", "tandem-tp4"]


@pytest.mark.parametrize(
    ("argv", "visible", "error", "message"),
    [
        (["--tensor-parallel-size", "2"], 1, ValueError, r"=2 needs 2 GPUs .*; 1 visible"),
        (["--tensor-parallel-size", "8"], 0, ValueError, r"=8 needs 8 GPUs .*; 0 visible"),
        (["--tensor-parallel-size", "0"], 2, ValueError, r"=0 must be >= 1"),
        (["--tensor-parallel-size", "2", "--shape", "smollm2-135m"], 2,
         TensorParallelShapeError, r"num_heads=9"),
    ],
)  # fmt: skip
def test_sizes_the_gpus_or_the_shape_cannot_hold_are_refused_by_name(
    argv: list[str], visible: int, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        tandem_sizes(parse_args(argv), visible_gpus=visible)


def _result(rates: dict[int, float], ttft_s: float, tp_size: int) -> dict[str, object]:
    return {
        "decode": {b: {"median": r} for b, r in rates.items()},
        "ttft_s": {"median": ttft_s},
        "tensor_parallel_size": tp_size,
    }


def test_report_puts_tp_n_beside_tp1_with_its_speed_ups() -> None:
    args = parse_args(["--tensor-parallel-size", "2", "--batch-sizes", "1,16"])
    results = {
        "tandem": _result({1: 100.0, 16: 1000.0}, 0.080, 1),
        "tandem-tp2": _result({1: 170.0, 16: 1500.0}, 0.050, 2),
    }
    assert speedup_rows(results, [1, 16]) == [
        ["speed-up over TP=1, decode batch 1", "-", "1.70x"],
        ["speed-up over TP=1, decode batch 16", "-", "1.50x"],
        ["speed-up over TP=1, TTFT", "-", "1.60x"],
    ]
    table = report(args, NAMED_SHAPES["llama-3-8b"], results, [1, 16])
    header = [cell.strip() for cell in table.splitlines()[0].split("|")[1:-1]]
    assert header == ["metric", "tandem", "tandem-tp2"]
    assert "1.70x" in table
    # batch 1 bandwidth: TP=2 reads half the weights on each of two GPUs, so its share of
    # their peak is its rate times the step's bytes over twice one GPU's peak
    (bandwidth,) = [line for line in table.splitlines() if "peak bandwidth" in line]
    step_bytes = bytes_per_decode_step(NAMED_SHAPES["llama-3-8b"], 512 + 128 // 2)
    cells = [cell.strip() for cell in bandwidth.split("|")[2:4]]
    assert cells == [f"{100 * 100.0 * step_bytes / 3.0e12:.0f}%",
                     f"{100 * 170.0 * step_bytes / (2 * 3.0e12):.0f}%"]  # fmt: skip
    assert speedup_rows({"tandem": results["tandem"]}, [1, 16]) == []

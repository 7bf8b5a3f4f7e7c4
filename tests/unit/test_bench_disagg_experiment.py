"""bench.disagg_experiment's configurations on the CPU (the experiment itself needs GPUs):
the pools each name starts, the planner's layouts looked up from a real `tandem plan` over the
stored H100 profile, and the long-prompt workload fitting the Llama-3-8B context."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.disagg_experiment import (
    parse_args,
    planned_layout,
    resolve,
    serve_args,
    workload_args,
)
from bench.serving.workload import length_range
from engine.model_config import NAMED_SHAPES


def _pools(gpus: int, name: str, *extra: str) -> list[str]:
    return serve_args(parse_args(["--gpus", str(gpus), *extra]), name)


def test_each_configuration_starts_its_pools_on_every_gpu() -> None:
    assert _pools(2, "colocated") == ["--mode", "colocated", "--workers", "2"]
    disaggregated = ["--mode", "disaggregated", "--prefill-workers", "1", "--decode-workers", "1"]
    assert _pools(2, "disaggregated") == [*disaggregated, "--disagg", "always"]
    assert _pools(2, "auto") == [*disaggregated, "--disagg", "auto"]
    assert _pools(4, "auto")[2:6] == ["--prefill-workers", "2", "--decode-workers", "2"]
    one_to_three = ["--prefill-workers", "1", "--decode-workers", "3"]
    assert _pools(4, "auto", "--split", "1:3")[2:6] == one_to_three
    assert _pools(4, "3P1D-auto")[2:] == ["--prefill-workers", "3", "--decode-workers", "1",
                                         "--disagg", "auto"]  # fmt: skip


@pytest.mark.parametrize(
    ("gpus", "name", "message"),
    [
        (2, "split", r"unknown 'split' \(split\)"),
        (4, "1P1D", r"'1P1D': 1P1D is not --gpus=4 workers"),
        (2, "0P2D", r"0P2D is not --gpus=2"),
    ],
)
def test_unknown_or_misfit_configurations_are_refused_by_name(
    gpus: int, name: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _pools(gpus, name)


def test_planner_layouts_come_from_its_predictions() -> None:
    plan = {
        "recommended": "colocated",
        "predictions": [
            {"configuration": "colocated", "rate": 2.0, "goodput": 1.9},
            {"configuration": "1P1D", "rate": 2.0, "goodput": 1.2},
            {"configuration": "1P1D-auto", "rate": 4.0, "goodput": 1.5},
            {"configuration": "1P1D", "rate": 1.0, "goodput": 1.5},  # ties: the lower rate
        ],
    }
    assert planned_layout(plan, split_only=False) == "colocated"
    assert planned_layout(plan, split_only=True) == "1P1D"


def test_the_planner_is_asked_once_for_both_of_its_layouts(tmp_path: Path) -> None:
    args = parse_args(["--gpus", "2", "--rates", "1", "--num-prompts", "8",
                       "--workload", "long-prompt", "--out", str(tmp_path)])  # fmt: skip
    resolved = resolve(args, ["colocated", "planner", "planner-split"], tmp_path)
    assert resolved["planner-split"][:2] == ["--mode", "disaggregated"]
    assert resolved["planner"] in (resolved["colocated"], resolved["planner-split"])
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["gpus"] == 2
    assert {p["configuration"] for p in plan["predictions"]} == {"colocated", "1P1D", "1P1D-auto"}


def test_long_prompts_are_4k_to_8k_tokens_and_fit_the_llama_3_8b_context() -> None:
    flags = workload_args(parse_args(["--workload", "long-prompt"]))
    value = dict(zip(flags[::2], flags[1::2], strict=True))
    assert value["--workload"] == "random"
    ratio = float(value["--range-ratio"])
    low_in, high_in = length_range(int(value["--input-len"]), ratio)
    _, high_out = length_range(int(value["--output-len"]), ratio)
    assert low_in >= 4000 and high_in <= 8000
    assert high_in + high_out <= NAMED_SHAPES["llama-3-8b"].max_position_embeddings
    mixed = workload_args(parse_args([]))
    assert mixed[:2] == ["--workload", "mixed"] and "1024:16" in mixed

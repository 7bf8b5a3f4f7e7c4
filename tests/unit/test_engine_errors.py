"""Bad input is refused with a named error and leaves the engine serving: every invalid request
through Engine.add_request raises InvalidRequest with the right field and a message naming the
problem; invalid EngineConfig / SchedulerConfig values raise ValueError naming the field; model
specs that cannot be loaded raise ModelLoadError, or UnsupportedModel when readable but not
runnable."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest

from contracts.errors import InvalidRequest, ModelLoadError, UnsupportedModel
from contracts.outputs import FinishReason
from contracts.sampling_params import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.loader import describe_model, resolve_model
from engine.scheduler import SchedulerConfig
from tests.conftest import greedy, make_engine

MAX_MODEL_LEN = 64
VOCAB = 512
PROMPT = [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return make_engine(max_model_len=MAX_MODEL_LEN)


def params(**kwargs: Any) -> dict[str, Any]:
    """add_request arguments: the valid PROMPT with these sampling parameters."""
    return {"prompt_token_ids": PROMPT, "sampling_params": SamplingParams(**kwargs)}


# (add_request keyword arguments, field, words the message must contain)
BAD_REQUESTS = [
    pytest.param({"prompt_token_ids": []}, "prompt", "empty", id="empty-prompt"),
    pytest.param(
        {"prompt_token_ids": [1] * MAX_MODEL_LEN}, "prompt", "64 tokens", id="prompt-equals-context"
    ),
    pytest.param(
        {"prompt_token_ids": [1] * 100}, "prompt", "100 tokens", id="prompt-exceeds-context"
    ),
    pytest.param(params(max_tokens=0), "max_tokens", ">= 1, got 0", id="max-tokens-0"),
    pytest.param(params(max_tokens=-3), "max_tokens", ">= 1, got -3", id="max-tokens-negative"),
    pytest.param(
        params(max_tokens=MAX_MODEL_LEN + 1), "max_tokens", "context length 64", id="max-tokens-big"
    ),
    pytest.param(params(max_tokens=2.5), "max_tokens", "integer", id="max-tokens-float"),
    pytest.param(params(max_tokens="8"), "max_tokens", "integer", id="max-tokens-str"),
    pytest.param(params(max_tokens=True), "max_tokens", "integer", id="max-tokens-bool"),
    pytest.param(params(temperature=-1.0), "temperature", "got -1", id="temperature-negative"),
    pytest.param(params(temperature=math.nan), "temperature", "finite", id="temperature-nan"),
    pytest.param(params(temperature=math.inf), "temperature", "finite", id="temperature-inf"),
    pytest.param(params(top_p=0.0), "top_p", "(0.0, 1.0]", id="top-p-0"),
    pytest.param(params(top_p=1.5), "top_p", "got 1.5", id="top-p-1.5"),
    pytest.param(params(top_p=math.nan), "top_p", "finite", id="top-p-nan"),
    pytest.param(params(top_k=-1), "top_k", "[0, 512], got -1", id="top-k-negative"),
    pytest.param(params(min_p=2.0), "min_p", "got 2", id="min-p-2"),
    pytest.param(
        params(repetition_penalty=0.0), "repetition_penalty", "(0.0", id="repetition-penalty-0"
    ),
    pytest.param(
        params(frequency_penalty=3.0), "frequency_penalty", "got 3", id="frequency-penalty-3"
    ),
    pytest.param(params(seed=-1), "seed", "got -1", id="seed-negative"),
    pytest.param(
        {"prompt_token_ids": [1, -1]}, "prompt_token_ids", "-1 is outside", id="prompt-token-neg"
    ),
    pytest.param(
        {"prompt_token_ids": [1, VOCAB]},
        "prompt_token_ids",
        "512 is outside",
        id="prompt-token-512",
    ),
    pytest.param(
        {"prompt_token_ids": [1, 2.0]}, "prompt_token_ids", "integer", id="prompt-token-float"
    ),
    pytest.param(
        params(stop_token_ids=(VOCAB,)), "stop_token_ids", "512 is outside", id="stop-token-512"
    ),
    pytest.param(
        params(stop_token_ids=(-1,)), "stop_token_ids", "-1 is outside", id="stop-token-negative"
    ),
    pytest.param(
        params(logit_bias=((VOCAB, 1.0),)), "logit_bias", "512 is outside", id="logit-bias-512"
    ),
    pytest.param(
        params(logit_bias=((3, math.nan),)), "logit_bias", "finite", id="logit-bias-nan-value"
    ),
    pytest.param(params(logprobs=21), "logprobs", "[0, 20], got 21", id="logprobs-21"),
    pytest.param(params(stop=("",)), "stop", "non-empty", id="stop-empty-string"),
    pytest.param({"prompt": "hello"}, "prompt", "no tokenizer", id="text-without-tokenizer"),
    pytest.param(
        {"messages": [{"role": "user", "content": "hi"}]},
        "prompt",
        "no tokenizer",
        id="messages-without-tokenizer",
    ),
    pytest.param(
        {"prompt": "hello", "prompt_token_ids": PROMPT}, "prompt", "exactly one", id="two-prompts"
    ),
    pytest.param({}, "prompt", "exactly one", id="no-prompt"),
]


@pytest.mark.parametrize(("kwargs", "field", "words"), BAD_REQUESTS)
def test_bad_request_is_refused_with_its_field(
    engine: Engine, kwargs: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        engine.add_request("bad", **kwargs)
    assert info.value.field == field
    assert words in info.value.reason
    assert str(info.value) == f"{field}: {info.value.reason}"
    assert not engine.has_unfinished_requests()
    engine.check_integrity()


def test_limits_themselves_are_accepted(engine: Engine) -> None:
    """The edges next to each refusal: the longest prompt, the largest max_tokens, 20 logprobs."""
    accepted = {
        "longest": {"prompt_token_ids": [1] * (MAX_MODEL_LEN - 1)},
        "max-tokens": params(max_tokens=MAX_MODEL_LEN),
        "top-logprobs": params(logprobs=20, top_p=1.0, min_p=1.0, top_k=0),
        "edge-ids": {"prompt_token_ids": [0, VOCAB - 1]},
    }
    for request_id, kwargs in accepted.items():
        assert engine.add_request(request_id, **kwargs) == list(kwargs["prompt_token_ids"])
    for request_id in accepted:
        assert engine.abort_request(request_id) is not None
    assert not engine.has_unfinished_requests()
    engine.check_integrity()


def test_duplicate_request_id_is_refused_and_the_first_keeps_running(engine: Engine) -> None:
    engine.add_request("dup", prompt_token_ids=PROMPT, sampling_params=greedy(3))
    with pytest.raises(InvalidRequest) as info:
        engine.add_request("dup", prompt_token_ids=[9, 9], sampling_params=greedy(5))
    assert info.value.field == "request_id"
    assert "'dup' is already in use" in info.value.reason
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.request_id for o in outputs] == ["dup"] * 3
    assert outputs[-1].usage.prompt_tokens == len(PROMPT)
    assert outputs[-1].finish_reason is FinishReason.LENGTH
    engine.check_integrity()


def test_engine_serves_after_every_kind_of_refusal() -> None:
    engine = make_engine(max_model_len=MAX_MODEL_LEN)
    reference = engine.generate([PROMPT], greedy(6))[0]
    for case in BAD_REQUESTS:
        kwargs = case.values[0]
        with pytest.raises(InvalidRequest):
            engine.add_request("again", **kwargs)  # the same id each time: never reserved
    assert not engine.has_unfinished_requests()
    engine.check_integrity()
    engine.add_request("again", prompt_token_ids=PROMPT, sampling_params=greedy(6))
    tokens = []
    while engine.has_unfinished_requests():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    assert tokens == reference.token_ids
    assert len(tokens) == 6
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"device": "tpu"}, "device"),
        ({"dtype": "int8"}, "dtype"),
        ({"block_size": 3}, "block_size"),
        ({"block_size": 0}, "block_size"),
        ({"num_kv_blocks": 0}, "num_kv_blocks"),
        ({"kv_cache_bytes": -1}, "kv_cache_bytes"),
        ({"max_model_len": 0}, "max_model_len"),
    ],
)
def test_engine_config_rejects_bad_values(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}="):
        EngineConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"max_prefill_chunk_tokens": 0}, "max_prefill_chunk_tokens"),
        ({"max_prefill_chunk_tokens": -5}, "max_prefill_chunk_tokens"),
    ],
)
def test_scheduler_config_rejects_bad_values(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}="):
        SchedulerConfig(**kwargs)


def test_max_model_len_beyond_the_model_context_is_refused() -> None:
    with pytest.raises(ValueError, match="max_model_len=2048 exceeds the model's context 1024"):
        make_engine(max_model_len=2048)


def test_missing_model_path() -> None:
    with pytest.raises(ModelLoadError, match="not found") as info:
        resolve_model("nonexistent/path")
    assert type(info.value) is ModelLoadError


def test_unknown_dummy_shape() -> None:
    with pytest.raises(UnsupportedModel, match="'nope'"):
        resolve_model("dummy:nope")


def test_unsupported_hf_architecture(tmp_path: Path) -> None:
    config = {"architectures": ["BertModel"], "hidden_size": 64, "num_attention_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="BertModel"):
        describe_model(resolve_model(str(tmp_path)))
    with pytest.raises(UnsupportedModel, match="BertModel"):
        Engine(EngineConfig(model=str(tmp_path), device="cpu"))


@pytest.mark.parametrize(
    ("config_text", "words"), [(None, "no config.json"), ("{not json", "not valid JSON")]
)
def test_broken_hf_directory(tmp_path: Path, config_text: str | None, words: str) -> None:
    if config_text is not None:
        (tmp_path / "config.json").write_text(config_text)
    with pytest.raises(ModelLoadError, match=words) as info:
        describe_model(resolve_model(str(tmp_path)))
    assert type(info.value) is ModelLoadError


GGUF_HEADER = b"GGUF" + struct.pack("<I", 3)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"this is not a gguf file " * 8, id="garbage"),
        pytest.param(b"", id="empty"),
        pytest.param(GGUF_HEADER[:6], id="cut-in-header"),
        pytest.param(
            GGUF_HEADER + struct.pack("<QQ", 0, 1) + struct.pack("<Q", 5) + b"ab",
            id="truncated-metadata",
        ),
    ],
)
def test_unreadable_gguf_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="cannot read GGUF file") as info:
        describe_model(resolve_model(str(path)))
    assert type(info.value) is ModelLoadError


def test_unreadable_gguf_file_through_the_engine(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError, match=r"x\.gguf"):
        Engine(EngineConfig(model=str(path), device="cpu"))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(stop="ab"), "stop"),
        (dict(stop_token_ids=5), "stop_token_ids"),
        (dict(logit_bias={5: 1.0}), "logit_bias"),
        (dict(logit_bias=((5,),)), "logit_bias"),
    ],
)
def test_wrongly_typed_sampling_fields_are_invalid(changes: dict, field: str) -> None:
    params = SamplingParams(**changes)
    with pytest.raises(InvalidRequest) as error:
        params.validate(vocab_size=512)
    assert error.value.field == field


def test_stop_strings_need_a_tokenizer() -> None:
    engine = make_engine()
    with pytest.raises(InvalidRequest) as error:
        engine.add_request("r", None, SamplingParams(stop=("x",)), prompt_token_ids=[1, 2, 3])
    assert error.value.field == "stop"
    assert "no tokenizer" in str(error.value)
    engine.check_integrity()

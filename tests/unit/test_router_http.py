"""router.http and router.openai_api: the OpenAI-compatible edge over real HTTP on loopback
(uvicorn in the test's event loop), in front of the real request path (router.core) with fake
workers (tests/unit/test_router_cancel.py's): the same error texts as the gRPC edge with
OpenAI's error JSON and HTTP statuses, SSE streaming with usage, and a client that goes away
cancelling its request on the workers. The real service (Ray, the default model, the `openai`
client, a load generator) is tests/integration/test_http_openai.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import pytest

from contracts.chat import ChatMessage
from contracts.errors import InvalidRequest
from contracts.outputs import FinishReason, RequestOutput, TokenLogprobs, Usage
from proto.tandem.v1 import tandem_pb2 as pb
from router.admission import Admission, AdmissionLimits
from router.auth import Guard, current_tenant, parse_api_keys
from router.http import MAX_BODY_BYTES, start_http_server
from router.requests import ServedModel, validate_generate_request
from router.server import ServingGate, TandemServicer
from tests.unit.test_router_cancel import FakePool, FakeWorker

VOCAB = 100
PROMPT = [5, 6, 7, 8]


class WordTokenizer:
    """One token per word (id: its length), a chat template that joins the turns."""

    has_chat_template = True

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [min(len(word), VOCAB - 1) for word in text.split()]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{t}>" for t in token_ids)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any] | ChatMessage],
        add_generation_prompt: bool = True,
    ) -> str:
        return " ".join(f"{m.role}: {m.content}" for m in messages if isinstance(m, ChatMessage))


MODEL = ServedModel("m", vocab_size=VOCAB, max_model_len=64, tokenizer=WordTokenizer())


def output(
    text: str, finished: bool = False, completion_tokens: int = 1, token: int = 11,
    logprobs: bool = False,
) -> RequestOutput:  # fmt: skip
    usage = Usage(prompt_tokens=len(PROMPT), cached_tokens=2, completion_tokens=completion_tokens)
    reason = FinishReason.LENGTH if finished else None
    lps = (TokenLogprobs(token, -0.5, ((token, -0.5), (3, -1.5))),) if logprobs else ()
    return RequestOutput("r1", (token,), text, finished, reason, usage, lps)


class Edge:
    """A TandemServicer over one fake colocated worker, behind a gate, served over HTTP."""

    def __init__(
        self, admission: Admission | None = None, open_gate: bool = True,
        disaggregated: bool = False, guard: Guard | None = None,
    ) -> None:  # fmt: skip
        self.worker = FakeWorker("decode-0")  # the decode worker, when disaggregated
        self.prefill = FakeWorker("prefill-0") if disaggregated else None
        prefill = None if self.prefill is None else FakePool("prefill", [self.prefill])
        decode = FakePool("decode", [self.worker])
        self.servicer = TandemServicer(MODEL, decode, prefill, admission)
        self.gate = ServingGate()
        if open_gate:
            self.gate.open(self.servicer)
        self.guard = guard
        self.port = 0
        self.server: Any = None

    async def __aenter__(self) -> Edge:
        self.server = await start_http_server("127.0.0.1", 0, self.gate, self.guard)
        self.port = self.server.port
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(1.0)

    async def connect(
        self, method: str, path: str, body: Any = None, key: str | None = "k1"
    ) -> Any:
        """An open connection with the request sent: (reader, writer)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        data = body if isinstance(body, bytes) else json.dumps(body).encode() if body else b""
        auth = "" if key is None else f"Authorization: Bearer {key}\r\n"
        head = (f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                f"{auth}Content-Length: {len(data)}\r\n\r\n")  # fmt: skip
        writer.write(head.encode() + data)
        await writer.drain()
        return reader, writer

    async def call(
        self, method: str, path: str, body: Any = None, key: str | None = "k1"
    ) -> tuple[int, bytes]:
        """(status, body) of a whole exchange."""
        reader, writer = await self.connect(method, path, body, key)
        try:
            status, headers = await read_head(reader)
            if "content-length" in headers:
                data = await reader.readexactly(int(headers["content-length"]))
            else:
                data = await read_chunked(reader)
            return status, data
        finally:
            writer.close()

    async def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        for _ in range(500):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"not within 5 s: {what}")


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_chunk(reader: asyncio.StreamReader) -> bytes:
    size = int((await reader.readline()).strip(), 16)
    data = await reader.readexactly(size + 2)
    return data[:-2]


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while chunk := await read_chunk(reader):
        parts.append(chunk)
    return b"".join(parts)


def events(data: bytes) -> list[Any]:
    """The `data:` payloads of a server-sent event stream ([DONE] as the string)."""
    found = []
    for block in data.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                found.append(payload if payload == "[DONE]" else json.loads(payload))
    return found


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": PROMPT, "max_tokens": 8, **fields}


def grpc_error(**sampling: Any) -> str:
    """What the gRPC edge says of the same request."""
    request = pb.GenerateRequest(
        model="m", token_ids=pb.TokenIds(ids=PROMPT), sampling=pb.SamplingParameters(**sampling)
    )
    with pytest.raises(InvalidRequest) as raised:
        validate_generate_request(request, MODEL)
    return str(raised.value)


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": 0},
        {"temperature": 101.0},
        {"top_p": 0.0},
        {"top_k": 1000},
        {"presence_penalty": 3.0},
        {"stop": [f"s{i}" for i in range(17)]},
        {"logit_bias": {1000: 1.0}},
        {"seed": 2**63},
    ],
    ids=lambda f: next(iter(f)),
)
def test_a_bad_sampling_field_gets_the_grpc_edges_text_as_a_400(fields: dict[str, Any]) -> None:
    async def test() -> None:
        async with Edge() as edge:
            status, data = await edge.call("POST", "/v1/completions", completion(**fields))
        assert status == 400
        error = json.loads(data)["error"]
        assert error["message"] == grpc_error(**fields)
        assert error["type"] == "invalid_request_error"
        assert error["param"] == next(iter(fields))

    run(test)


@pytest.mark.parametrize(
    "body, status, param, says",
    [
        (b"{not json", 400, "body", "is not valid JSON"),
        (b"[1, 2]", 400, "body", "must be a JSON object"),
        (completion(model="other"), 404, "model", "model 'other' is not served here"),
        (completion(n=2), 400, "n", "must be 1, got 2"),
        (completion(prompt=["a", "b"]), 400, "prompt", "one prompt per request, got 2"),
        (completion(prompt=[5, 500]), 400, "prompt_token_ids", "token id 500 is outside"),
        (completion(prompt=""), 400, "text", "prompt is empty"),
        (completion(temperature="hot"), 400, "temperature", "must be a number, got 'hot'"),
        (completion(echo=True), 400, "echo", "is not served"),
        (completion(logprobs=21), 400, "logprobs", "must be in [0, 20], got 21"),
        (completion(prompt=list(range(1, 65))), 400, "prompt", "prompt has 64 tokens"),
    ],
    ids=[
        "json",
        "not-object",
        "model",
        "n",
        "batch",
        "token",
        "empty",
        "type",
        "echo",
        "logprobs",
        "context",
    ],
)
def test_a_bad_body_is_refused_naming_the_field(
    body: Any, status: int, param: str, says: str
) -> None:
    async def test() -> None:
        async with Edge() as edge:
            got, data = await edge.call("POST", "/v1/completions", body)
            assert edge.worker.calls == []  # refused before any worker heard of it
        assert got == status, data
        error = json.loads(data)["error"]
        assert error["param"] == param and says in error["message"], error
        if status == 404:
            assert error["code"] == "model_not_found"

    run(test)


def test_a_full_router_is_a_429_and_one_still_loading_a_503() -> None:
    async def test() -> None:
        async with Edge(Admission(AdmissionLimits(max_requests=1))) as edge:
            held = await edge.connect("POST", "/v1/completions", completion(stream=True))
            await edge.wait_until(lambda: edge.servicer.admission.requests == 1, "admitted")
            status, data = await edge.call("POST", "/v1/completions", completion())
            assert status == 429, data
            error = json.loads(data)["error"]
            assert error["type"] == "rate_limit_error"
            assert error["message"] == "overloaded: 1 requests in flight (limit 1)"
            held[1].close()
        async with Edge(open_gate=False) as edge:
            status, data = await edge.call("POST", "/v1/chat/completions", {"messages": []})
            assert status == 503
            assert json.loads(data)["error"]["message"] == "starting: worker pools not ready"
            status, _ = await edge.call("GET", "/health")
            assert status == 503

    run(test)


def test_a_streamed_completion_and_chat_with_usage() -> None:
    async def test() -> None:
        async with Edge() as edge:
            edge.worker.batches.put_nowait([("r1", output("Hello"))])
            edge.worker.batches.put_nowait([("r1", output(" world", True, 2))])
            body = completion(stream=True, stream_options={"include_usage": True})
            status, data = await edge.call("POST", "/v1/completions", body)
            assert status == 200
            chunks = events(data)
            assert chunks[-1] == "[DONE]"
            texts = [c["choices"][0]["text"] for c in chunks[:2]]
            assert texts == ["Hello", " world"]
            assert [c["choices"][0]["finish_reason"] for c in chunks[:2]] == [None, "length"]
            assert chunks[2]["choices"] == []
            assert chunks[2]["usage"] == {
                "prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
                "prompt_tokens_details": {"cached_tokens": 2},
            }  # fmt: skip
            assert chunks[0]["object"] == "text_completion" and chunks[0]["model"] == "m"

            edge.worker.batches.put_nowait([("r1", output("Hi", True))])
            chat = {"messages": [{"role": "user", "content": "say hi"}], "stream": True}
            status, data = await edge.call("POST", "/v1/chat/completions", chat)
            chunks = events(data)
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hi"}
            assert chunks[0]["object"] == "chat.completion.chunk"
            assert "usage" not in chunks[0] and chunks[-1] == "[DONE]"
            # the chat template's prompt; no max_tokens: to the end of the 64-token context
            ((_, args),) = [c for c in edge.worker.calls if c[0] == "start_generate"][1:]
            assert args[2] == [5, 3, 2] and args[3].max_tokens == 61

    run(test)


def test_a_whole_chat_completion_and_the_model_list() -> None:
    async def test() -> None:
        async with Edge() as edge:
            edge.worker.batches.put_nowait([("r1", output("Hello"))])
            edge.worker.batches.put_nowait([("r1", output(" there", True, 2))])
            parts = [{"type": "text", "text": "x"}]
            chat = {"model": "m", "max_tokens": 4, "temperature": 0,
                    "messages": [{"role": "user", "content": parts}]}  # fmt: skip
            status, data = await edge.call("POST", "/v1/chat/completions", chat)
            assert status == 200, data
            body = json.loads(data)
            assert body["object"] == "chat.completion"
            assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello there"}
            assert body["choices"][0]["finish_reason"] == "length"
            assert body["usage"]["completion_tokens"] == 2
            status, data = await edge.call("GET", "/v1/models")
            assert status == 200
            assert [m["id"] for m in json.loads(data)["data"]] == ["m"]
            status, data = await edge.call("GET", "/health")
            assert status == 200 and json.loads(data)["status"] == "ok"
            status, data = await edge.call("GET", "/v1/embeddings")  # OpenAI's error JSON too
            assert status == 404 and json.loads(data)["error"]["message"].startswith("path: no ")
            status, data = await edge.call("GET", "/v1/completions")
            assert status == 405 and json.loads(data)["error"]["param"] == "method"

    run(test)


@pytest.mark.parametrize("disaggregated", [False, True], ids=["colocated", "disaggregated"])
@pytest.mark.parametrize("stream", [True, False], ids=["mid-stream", "before-any-output"])
def test_a_client_that_goes_away_cancels_its_request_on_the_worker(
    stream: bool, disaggregated: bool
) -> None:
    """The connection closes mid-stream (after the first chunk), or while a whole response is
    awaited: the request is aborted on the (decode) worker, its output queue and admission
    released. Disaggregated, its prefill had finished: nothing to abort there."""

    async def test() -> None:
        async with Edge(disaggregated=disaggregated) as edge:
            if stream:
                edge.worker.batches.put_nowait([("r1", output("Hello"))])
            reader, writer = await edge.connect(
                "POST", "/v1/completions", completion(stream=stream)
            )
            await edge.wait_until(lambda: edge.worker.unfinished != [], "started")
            if stream:
                status, _ = await read_head(reader)
                assert status == 200
                assert b'"Hello"' in await read_chunk(reader)
            assert edge.worker.aborted() == []
            writer.close()
            await edge.wait_until(lambda: edge.worker.aborted() == ["r1"], "aborted")
            await edge.wait_until(lambda: edge.servicer.outputs.num_open == 0, "queue closed")
            await edge.wait_until(lambda: edge.servicer.admission.requests == 0, "released")
            assert edge.gate.num_streams == 0
            assert edge.prefill is None or edge.prefill.aborted() == []

    run(test)


ALPHA_KEY = "alpha-key-0123456789abcdef"
BETA_KEY = "beta-key-0123456789abcdef"


def test_api_keys_refuse_callers_before_any_work_and_scope_each_tenant() -> None:
    """With a guard (router.auth), a missing or wrong key is a 401 in OpenAI's error JSON,
    counted, before the request path runs (the models list too; /health stays open); a valid
    key runs the request as its tenant (router.core reads current_tenant for the cache salt) and
    gives its in-flight place back at the end."""
    failures: list[str] = []
    guard = Guard(parse_api_keys(f"alpha:{ALPHA_KEY}\nbeta:{BETA_KEY}", "test"), failures.append)
    tenants: list[str | None] = []

    async def test() -> None:
        async with Edge(guard=guard) as edge:
            generate = edge.servicer.generate

            def spy(*args: Any, **kwargs: Any) -> Any:
                tenant = current_tenant.get()
                tenants.append(None if tenant is None else tenant.name)
                return generate(*args, **kwargs)

            edge.servicer.generate = spy  # type: ignore[method-assign]
            status, data = await edge.call("POST", "/v1/completions", completion(), key=None)
            assert status == 401
            assert json.loads(data)["error"]["type"] == "authentication_error"
            status, _ = await edge.call("POST", "/v1/completions", completion(), key="k" * 20)
            assert status == 401
            assert (await edge.call("GET", "/v1/models", key=None))[0] == 401
            assert (await edge.call("GET", "/health", key=None))[0] == 200
            assert tenants == []  # nothing reached the request path
            assert failures == ["missing", "invalid_key", "missing"]
            edge.worker.batches.put_nowait([("r1", output("x", True))])
            status, _ = await edge.call("POST", "/v1/completions", completion(), key=BETA_KEY)
            assert status == 200
            assert (await edge.call("GET", "/v1/models", key=ALPHA_KEY))[0] == 200
        assert tenants == ["beta"]
        assert guard.in_flight.get("beta", 0) == 0

    run(test)


def test_a_tenant_at_its_in_flight_bound_gets_429_while_others_are_served() -> None:
    """Per-tenant bounds hold on the HTTP edge as on gRPC: alpha (bound 1) with a stream open
    gets 429 for a second request; beta is served; alpha's place comes back when its stream
    ends."""
    keys = parse_api_keys(f"alpha:{ALPHA_KEY}:1\nbeta:{BETA_KEY}", "test")
    refused: list[str] = []
    guard = Guard(keys, on_refused=refused.append)

    async def test() -> None:
        async with Edge(guard=guard) as edge:
            edge.worker.batches.put_nowait([("r1", output("Hello"))])
            reader, writer = await edge.connect(
                "POST", "/v1/completions", completion(stream=True), key=ALPHA_KEY
            )
            assert (await read_head(reader))[0] == 200
            assert b'"Hello"' in await read_chunk(reader)
            status, data = await edge.call("POST", "/v1/completions", completion(), key=ALPHA_KEY)
            assert status == 429, data
            assert refused == ["alpha"]
            assert guard.in_flight["alpha"] == 1
            writer.close()  # alpha's client goes away: its request is cancelled, place freed
            await edge.wait_until(lambda: guard.in_flight.get("alpha", 0) == 0, "alpha freed")

    run(test)


def test_shutdown_refuses_new_requests_and_cuts_open_streams_with_the_reason() -> None:
    """The gate drains HTTP streams with the gRPC ones: once closed, a new request is a 503
    naming the reason; `cut` ends an open stream with an error event and aborts its request."""

    async def test() -> None:
        async with Edge() as edge:
            edge.worker.batches.put_nowait([("r1", output("Hello"))])
            reader, writer = await edge.connect("POST", "/v1/completions", completion(stream=True))
            assert (await read_head(reader))[0] == 200
            assert b'"Hello"' in await read_chunk(reader)
            assert edge.gate.num_streams == 1
            edge.gate.close("shutting down: this server takes no new requests")
            status, data = await edge.call("POST", "/v1/completions", completion())
            assert status == 503
            message = json.loads(data)["error"]["message"]
            assert message == "shutting down: this server takes no new requests"
            edge.gate.cut("shutting down: the grace period ended")
            rest = await read_chunked(reader)
            assert rest.startswith(b"event: error\ndata: ")
            error = json.loads(rest.split(b"data: ", 1)[1])["error"]
            assert error["message"] == "shutting down: the grace period ended"
            assert error["type"] == "service_unavailable_error"
            await edge.wait_until(lambda: edge.worker.aborted() == ["r1"], "aborted")
            assert await edge.gate.wait_idle(5.0) == 0
            writer.close()

    run(test)


def test_a_body_over_the_limit_is_refused_before_it_is_read() -> None:
    async def test() -> None:
        async with Edge() as edge:
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
            size = MAX_BODY_BYTES + 1
            writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: t\r\n"
                         f"Content-Length: {size}\r\n\r\n".encode())  # fmt: skip
            await writer.drain()
            status, headers = await read_head(reader)
            data = await reader.readexactly(int(headers["content-length"]))
            writer.close()
        assert status == 413
        assert json.loads(data)["error"]["message"] == f"body: is {size} bytes, limit {size - 1}"

    run(test)


def test_logprobs_in_openais_shapes() -> None:
    """Completions: tokens, token_logprobs, top_logprobs, text_offset per chunk; chat:
    `logprobs: true` and `top_logprobs` give the `content` list. The token texts are the
    model's tokenizer's (here: `<id>`)."""

    async def test() -> None:
        async with Edge() as edge:
            edge.worker.batches.put_nowait([("r1", output("a", token=11, logprobs=True))])
            edge.worker.batches.put_nowait([("r1", output("b", True, 2, 12, logprobs=True))])
            body = completion(stream=True, logprobs=1)
            status, data = await edge.call("POST", "/v1/completions", body)
            assert status == 200, data
            first, second = (c["choices"][0]["logprobs"] for c in events(data)[:2])
            top = [{"<11>": -0.5, "<3>": -1.5}]
            assert first == {"tokens": ["<11>"], "token_logprobs": [-0.5],
                             "top_logprobs": top, "text_offset": [0]}  # fmt: skip
            assert second["tokens"] == ["<12>"] and second["text_offset"] == [4]
            ((_, args),) = [c for c in edge.worker.calls if c[0] == "start_generate"]
            assert args[3].logprobs == 1

            edge.worker.batches.put_nowait([("r1", output("a", True, token=11, logprobs=True))])
            chat = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                    "top_logprobs": 1, "max_tokens": 1}  # fmt: skip
            status, data = await edge.call("POST", "/v1/chat/completions", chat)
            (entry,) = json.loads(data)["choices"][0]["logprobs"]["content"]
            assert entry == {
                "token": "<11>", "logprob": -0.5, "bytes": list(b"<11>"),
                "top_logprobs": [{"token": "<11>", "logprob": -0.5, "bytes": list(b"<11>")},
                                 {"token": "<3>", "logprob": -1.5, "bytes": list(b"<3>")}],
            }  # fmt: skip
            chat = {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}
            status, data = await edge.call("POST", "/v1/chat/completions", chat)
            assert status == 400
            assert json.loads(data)["error"]["message"] == "top_logprobs: needs logprobs: true"

    run(test)

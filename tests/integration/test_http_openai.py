"""The OpenAI-compatible HTTP edge of a real `tandem serve --http-port` (a separate process, a
local Ray cluster, the default model), spoken to by clients no one here wrote: the official
`openai` Python client (chat and completions, streamed and whole, logprobs, refusals) and the
GuideLLM load generator (a small run whose report must account for every request). Also: the
HTTP and gRPC edges give the same greedy text (one request path behind both), and a client
that disconnects mid-stream leaves no request and no KV block on the workers (read from the
service's own /metrics). One service for the whole module."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.test_service_cli import free_port, wait_for_line

pytestmark = [pytest.mark.integration, pytest.mark.slow]
pytest.importorskip("ray")
openai = pytest.importorskip("openai")

CLI = [sys.executable, "-m", "cluster.cli"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass(frozen=True)
class Served:
    http_port: int
    grpc_port: int
    metrics_port: int
    model: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    def client(self) -> object:
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=120)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def worker_figures(self, name: str) -> list[float]:
        return [value for (sample, _), value in self.metrics().items() if sample == name]


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    server = subprocess.Popen(
        [*CLI, "serve", "--port", str(grpc_port), "--http-port", str(http_port),
         "--metrics-port", str(metrics_port), "--mode", "colocated", "--workers", "1",
         "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )  # fmt: skip
    try:
        lines = wait_for_line(server, "OpenAI-compatible HTTP on", timeout_s=240)
        assert lines[-1] == f"tandem: OpenAI-compatible HTTP on http://127.0.0.1:{http_port}/v1\n"
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models") as response:
            (card,) = json.load(response)["data"]
        yield Served(http_port, grpc_port, metrics_port, card["id"])
    finally:  # Ctrl-C stops both edges cleanly (uvicorn does not take the signal over)
        server.send_signal(signal.SIGINT)
        try:
            rest, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            raise
        assert server.returncode == 0 and "tandem: stopped" in rest, rest[-3000:]


def test_chat_whole_and_streamed_with_the_openai_client(served: Served) -> None:
    client = served.client()
    assert [m.id for m in client.models.list()] == [served.model]  # type: ignore[attr-defined]
    whole = client.chat.completions.create(  # type: ignore[attr-defined]
        model=served.model, messages=QUESTION, max_tokens=20, temperature=0
    )
    answer = whole.choices[0].message.content
    assert answer.startswith("The capital of France is Paris"), answer
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "stop"
    assert 0 < whole.usage.completion_tokens <= 20
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = client.chat.completions.create(  # type: ignore[attr-defined]
        model=served.model, messages=QUESTION, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer  # greedy: the same tokens, streamed
    assert len([c for c in chunks if c.choices]) > 2, "streamed in pieces, not at once"
    usage = chunks[-1].usage  # the last chunk: no choices, the usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        whole.usage.prompt_tokens, whole.usage.completion_tokens,
    )  # fmt: skip
    # the same prompt again: its KV from the prefix cache
    assert usage.prompt_tokens_details.cached_tokens > 0


def test_completions_whole_and_streamed_equal_the_grpc_edge(served: Served) -> None:
    import grpc

    from proto.tandem.v1 import tandem_pb2 as pb
    from proto.tandem.v1 import tandem_pb2_grpc

    client = served.client()
    prompt = "The capital of France is"
    whole = client.completions.create(  # type: ignore[attr-defined]
        model=served.model, prompt=prompt, max_tokens=8, temperature=0, logprobs=2
    )
    streamed = client.completions.create(  # type: ignore[attr-defined]
        model=served.model, prompt=prompt, max_tokens=8, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].text for chunk in streamed)
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        request = pb.GenerateRequest(
            text=prompt, sampling=pb.SamplingParameters(max_tokens=8, temperature=0)
        )
        responses = list(tandem_pb2_grpc.TandemStub(channel).Generate(request, timeout=120))
    over_grpc = "".join(r.text for r in responses)
    assert whole.choices[0].text == text == over_grpc
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == responses[-1].usage.completion_tokens == 8
    assert whole.usage.prompt_tokens == responses[-1].usage.prompt_tokens
    logprobs = whole.choices[0].logprobs  # greedy: each token the most likely of its top 2
    assert "".join(logprobs.tokens) == whole.choices[0].text
    assert [len(top) for top in logprobs.top_logprobs] == [2] * 8
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert chosen == max(top.values()) <= 0


def test_refusals_reach_the_openai_client_as_its_errors(served: Served) -> None:
    client = served.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(  # type: ignore[attr-defined]
            model=served.model, prompt="Hi", max_tokens=4, temperature=-1
        )
    assert bad.value.status_code == 400
    assert bad.value.body["message"] == "temperature: must be in [0.0, 100.0], got -1"
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="n: must be 1, got 2"):
        client.chat.completions.create(  # type: ignore[attr-defined]
            model=served.model, messages=QUESTION, max_tokens=4, n=2
        )
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4o' is not served here"):
        client.chat.completions.create(  # type: ignore[attr-defined]
            model="gpt-4o", messages=QUESTION, max_tokens=4
        )


def test_a_disconnect_mid_stream_frees_the_workers(served: Served) -> None:
    """The client reads a few streamed chunks of a long generation and closes the
    connection: the request is cancelled (counted CANCELLED), and soon no worker runs a
    request or holds a KV block (cached prefixes count as free)."""
    key = ("tandem_requests_total", (("code", "CANCELLED"),))
    cancelled = served.metrics().get(key, 0.0)
    body = {"model": served.model, "prompt": "Tell me a very long story.", "max_tokens": 4000,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    connection = http.client.HTTPConnection("127.0.0.1", served.http_port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(body),
                       {"Content-Type": "application/json"})  # fmt: skip
    response = connection.getresponse()
    assert response.status == 200
    events = 0
    while events < 3:
        line = response.fp.readline()
        assert line, "the stream ended early"
        events += line.startswith(b"data: ")
    _wait_until(lambda: sum(served.worker_figures("tandem_kv_cache_blocks_used")) > 0,
                "the workers to report the request's KV")  # fmt: skip
    response.close()
    connection.close()
    _wait_until(lambda: served.metrics().get(key, 0.0) == cancelled + 1, "counted CANCELLED")
    _wait_until(
        lambda: (
            sum(served.worker_figures("tandem_kv_cache_blocks_used")) == 0
            and sum(served.worker_figures("tandem_requests_running")) == 0
            and sum(served.worker_figures("tandem_requests_waiting")) == 0
        ),
        "no request and no KV block left on the workers",
    )


def test_guidellm_load_against_the_http_edge(served: Served, tmp_path: Path) -> None:
    """GuideLLM (a third-party OpenAI-API load generator) at a small size: every request of
    its run succeeds with the token counts asked for, as its own report says."""
    guidellm = shutil.which("guidellm", path=str(Path(sys.executable).parent))
    if guidellm is None:
        pytest.skip("guidellm is not installed (pip install -e '.[test]')")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"prompt": f"({i}) Write a short story about a fox.", "output_tokens_count": 8})
        + "\n" for i in range(4)
    ))  # fmt: skip
    report = tmp_path / "guidellm.json"
    run = subprocess.run(
        [guidellm, "run",
         "--backend", f"kind=openai_http,target=http://127.0.0.1:{served.http_port},"
                      "request_format=/v1/completions,http2=false",
         "--data", f"kind=json_file,path={prompts}",
         "--profile", "kind=concurrent,streams=2",
         "--constraint", "kind=max_requests,count=4",
         "--output", f"kind=json,path={report}", "--disable-console"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (benchmark,) = json.loads(report.read_text())["benchmarks"]
    metrics = benchmark["metrics"]
    assert metrics["request_totals"] == {"successful": 4, "errored": 0, "incomplete": 0,
                                         "total": 4}  # fmt: skip
    outputs = metrics["output_token_count"]["successful"]
    assert outputs["min"] == outputs["max"] == 8  # ignore_eos honoured: exactly as asked
    assert metrics["time_to_first_token_ms"]["successful"]["count"] == 4  # streamed


def _wait_until(condition: object, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.2)

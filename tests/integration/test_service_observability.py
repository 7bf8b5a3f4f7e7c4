"""Tracing and metrics of the disaggregated service (real Ray, gRPC, gloo transfers, default
model): one trace per request across the router, the prefill worker, the KV transfer and the
decode worker, exported over OTLP/gRPC to a real collector server on loopback, continuing a
client's `traceparent`; a dead collector costs nothing but spans; /metrics covers requests by
status code, latencies, tokens, prefix-cache hits and the workers' KV and transfers."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from proto.tandem.v1 import tandem_pb2 as pb
from tests.integration.test_service import (
    RunningService,
    greedy_sampling,
    local_service,
    placing,
)
from tests.otlp_collector import Collector

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ray = pytest.importorskip("ray")
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    running = Collector()
    yield running
    running.server.stop(0)


@pytest.fixture(scope="module")
def service(collector: Collector) -> Iterator[RunningService]:
    from cluster.service import ServiceConfig
    from engine.config import EngineConfig
    from telemetry.tracing import TracingConfig

    config = ServiceConfig(
        engine=EngineConfig(device="cpu", num_kv_blocks=256, block_size=16),
        mode="disaggregated",
        port=0,
        metrics_port=0,
        tracing=TracingConfig(otlp_endpoint=f"127.0.0.1:{collector.port}"),
    )
    with local_service(config) as running:
        yield running


def test_one_trace_per_request_across_router_prefill_transfer_and_decode(
    service: RunningService, collector: Collector
) -> None:
    traceparent = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
    request = pb.GenerateRequest(
        text="The capital of France is", sampling=greedy_sampling(6), request_id="traced-1"
    )
    responses = list(
        service.stub.Generate(request, timeout=60, metadata=[("traceparent", traceparent)])
    )
    assert responses[-1].usage.completion_tokens == 6
    names = {"tandem.Generate", "validate", "place", "tandem.prefill", "queue", "compute",
             "tandem.kv_transfer", "tandem.decode", "stream"}  # fmt: skip
    deadline = time.monotonic() + 30
    while not names <= {s["name"] for s in collector.trace(CLIENT_TRACE_ID)}:
        assert time.monotonic() < deadline, [s["name"] for s in collector.trace(CLIENT_TRACE_ID)]
        time.sleep(0.2)
    spans = collector.trace(CLIENT_TRACE_ID)
    by_name = {s["name"]: s for s in spans}
    root = by_name["tandem.Generate"]
    assert root["parent"] == CLIENT_SPAN_ID  # the client's trace continues
    assert root["process"] == "router"
    assert root["attributes"]["tandem.request_id"] == "traced-1"
    assert root["attributes"]["tandem.completion_tokens"] == 6
    assert root["attributes"]["tandem.prefill_worker"] == 0
    assert root["attributes"]["tandem.prefill_path"] == "remote"
    assert root["attributes"]["tandem.prefill_reason"] == "forced_remote"
    prompt_tokens = responses[-1].usage.prompt_tokens  # under one block: nothing cached
    assert root["attributes"]["tandem.decode_cached_tokens"] == 0
    assert root["attributes"]["tandem.kv_transfer_tokens"] == prompt_tokens
    assert root["attributes"]["tandem.kv_transfer_blocks"] == 1
    prefill, decode = by_name["tandem.prefill"], by_name["tandem.decode"]
    transfer = by_name["tandem.kv_transfer"]
    for child in (prefill, decode, transfer, by_name["validate"], by_name["place"]):
        assert child["parent"] == root["span_id"], child["name"]
    assert (prefill["process"], decode["process"], transfer["process"]) == (
        "prefill-0", "decode-0", "prefill-0",
    )  # fmt: skip
    assert transfer["attributes"]["tandem.status"] == "completed"
    assert transfer["attributes"]["tandem.kv_bytes"] > 0
    phases = {(s["name"], s["parent"]) for s in spans}
    assert {("queue", prefill["span_id"]), ("compute", prefill["span_id"])} <= phases
    assert {("queue", decode["span_id"]), ("stream", decode["span_id"])} <= phases
    assert prefill["end"] <= decode["end"]
    assert decode["attributes"]["tandem.completion_tokens"] == 6


def test_a_request_prefilled_on_its_decode_worker_is_traced_there(
    service: RunningService, collector: Collector
) -> None:
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4737"
    traceparent = f"00-{trace_id}-{CLIENT_SPAN_ID}-01"
    request = pb.GenerateRequest(text="Hi", sampling=greedy_sampling(3), request_id="traced-2")
    with placing(service, mode="auto"):  # a short prompt: prefilled on the decode worker
        responses = list(
            service.stub.Generate(request, timeout=60, metadata=[("traceparent", traceparent)])
        )
    assert responses[-1].usage.completion_tokens == 3
    deadline = time.monotonic() + 30
    while not {"tandem.Generate", "tandem.generate"} <= {
        s["name"] for s in collector.trace(trace_id)
    }:
        assert time.monotonic() < deadline, [s["name"] for s in collector.trace(trace_id)]
        time.sleep(0.2)
    by_name = {s["name"]: s for s in collector.trace(trace_id)}
    root = by_name["tandem.Generate"]
    assert root["attributes"]["tandem.prefill_path"] == "local"
    assert root["attributes"]["tandem.prefill_reason"] == "short_prompt"
    assert by_name["tandem.generate"]["process"] == "decode-0"
    assert "tandem.prefill" not in by_name and "tandem.kv_transfer" not in by_name


def test_metrics_cover_requests_workers_and_transfers(service: RunningService) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    prompt = "Name a color and a fruit. " * 8  # a few 16-token blocks: the repeat hits them
    usages = [
        list(service.stub.Generate(
            pb.GenerateRequest(text=prompt, sampling=greedy_sampling(3)), timeout=60
        ))[-1].usage
        for _ in range(2)
    ]  # fmt: skip
    with pytest.raises(grpc.RpcError):
        list(service.stub.Generate(pb.GenerateRequest(text=""), timeout=60))
    time.sleep(service.service.config.health_interval_s * 2.5)  # workers' reports refreshed
    url = f"http://127.0.0.1:{service.service.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("tandem_requests_total", code="OK") >= 2
    assert value("tandem_requests_total", code="INVALID_ARGUMENT") >= 1
    assert value("tandem_time_to_first_token_seconds_count") >= 2
    assert value("tandem_inter_token_latency_seconds_count") >= 2 * 2  # 3 tokens: 2 gaps each
    assert value("tandem_generation_tokens_total") >= 6
    assert value("tandem_prefix_cache_queries_total") >= sum(u.prompt_tokens for u in usages)
    assert value("tandem_prefix_cache_hits_total") >= usages[1].cached_tokens > 0
    for pool, worker in (("prefill", "prefill-0"), ("decode", "decode-0")):
        free = value("tandem_kv_cache_blocks_free", pool=pool, worker=worker)
        used = value("tandem_kv_cache_blocks_used", pool=pool, worker=worker)
        assert free + used == 256
        assert value("tandem_pool_workers", pool=pool) == 1
    assert value("tandem_kv_transfer_bytes_total", pool="prefill", worker="prefill-0",
                 direction="sent") > 0  # fmt: skip
    assert value("tandem_kv_transfer_bytes_total", pool="decode", worker="decode-0",
                 direction="received") > 0  # fmt: skip
    assert value("tandem_kv_transfer_seconds_count", pool="decode", worker="decode-0") >= 2
    assert value("tandem_prefix_index_lookups_total") >= 2


def test_a_dead_collector_costs_spans_not_requests(
    service: RunningService, collector: Collector
) -> None:
    collector.server.stop(0)  # gone: exports now fail (and time out) in every process
    for n in range(3):
        request = pb.GenerateRequest(text=f"Say {n}.", sampling=greedy_sampling(3))
        started = time.monotonic()
        responses = list(service.stub.Generate(request, timeout=60))
        assert responses[-1].usage.completion_tokens == 3
        assert time.monotonic() - started < 10  # no export wait on the request's path

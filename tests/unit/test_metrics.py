"""The service's Prometheus metrics: request records and worker reports become the right
samples, /metrics serves them over HTTP, and the Grafana dashboard in deploy/ only queries
metrics that exist."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from contracts.workers import KVTransferCounters, WorkerStats
from prefix_cache.index import IndexMetrics
from telemetry.metrics import ServiceMetrics, start_metrics_server

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "tandem-dashboard.json"
WORKER_STATS = WorkerStats(
    num_requests=3, num_running=2, num_waiting=1, num_preemptions=4, num_blocks=100,
    num_free_blocks=75, num_prompt_tokens_computed=40,
    kv=KVTransferCounters(
        pairs_refused_by_reason={"unproven": 2, "over_limit": 1}, transfers_completed=2,
        transfers_failed=1, leases_expired=0, bytes_sent=0, bytes_received=4096,
        transfer_seconds=0.5, tokens_received=21, tokens_reused=32, kv_staging_waits=5,
        offers_deferred=3, offers_refused_for_room=1,
    ),
)  # fmt: skip


@pytest.fixture
def metrics() -> ServiceMetrics:
    metrics = ServiceMetrics()
    usage = SimpleNamespace(prompt_tokens=100, cached_tokens=64, completion_tokens=5)
    metrics.record_finished("OK", usage, 1.5, ttft_s=0.2, queue_s=0.05, gaps_s=[0.01] * 4)
    metrics.record_finished("INVALID_ARGUMENT", None, 0.001, None, None, [])
    metrics.observe_worker("decode", "decode-0", WORKER_STATS)
    metrics.observe_worker("prefill", "prefill-0", WorkerStats(num_requests=0, failure="boom"))
    index = IndexMetrics()
    index.record(10, [4, 0])
    index.num_degraded = 2
    metrics.watch_index(lambda: index)
    metrics.scaling_decisions.labels(pool="prefill", direction="up").inc()
    metrics.target_workers.labels(pool="prefill").set(2)
    return metrics


def sample(metrics: ServiceMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_requests_and_workers_become_samples(metrics: ServiceMetrics) -> None:
    assert sample(metrics, "tandem_requests_total", code="OK") == 1
    assert sample(metrics, "tandem_requests_total", code="INVALID_ARGUMENT") == 1
    assert sample(metrics, "tandem_e2e_request_latency_seconds_count") == 2
    assert sample(metrics, "tandem_time_to_first_token_seconds_count") == 1
    assert sample(metrics, "tandem_time_to_first_token_seconds_bucket", le="0.25") == 1
    assert sample(metrics, "tandem_inter_token_latency_seconds_count") == 4
    assert sample(metrics, "tandem_prefix_cache_queries_total") == 100
    assert sample(metrics, "tandem_prefix_cache_hits_total") == 64
    assert sample(metrics, "tandem_generation_tokens_total") == 5
    worker = {"pool": "decode", "worker": "decode-0"}
    assert sample(metrics, "tandem_requests_running", **worker) == 2
    assert sample(metrics, "tandem_requests_waiting", **worker) == 1
    assert sample(metrics, "tandem_kv_cache_blocks_used", **worker) == 25
    assert sample(metrics, "tandem_kv_cache_usage_ratio", **worker) == 0.25
    assert sample(metrics, "tandem_preemptions_total", **worker) == 4
    assert sample(metrics, "tandem_kv_transfer_bytes_total", **worker, direction="received") == 4096
    assert sample(metrics, "tandem_kv_transfer_seconds_count", **worker) == 2
    assert sample(metrics, "tandem_kv_transfer_seconds_sum", **worker) == 0.5
    assert sample(metrics, "tandem_kv_transfer_failures_total", **worker) == 1
    assert sample(metrics, "tandem_kv_pairs_refused_total", **worker, reason="unproven") == 2
    assert sample(metrics, "tandem_kv_pairs_refused_total", **worker, reason="over_limit") == 1
    assert sample(metrics, "tandem_prompt_tokens_computed_total", **worker) == 40
    assert sample(metrics, "tandem_kv_prompt_tokens_total", **worker, direction="received") == 21
    assert sample(metrics, "tandem_kv_prompt_tokens_total", **worker, direction="reused") == 32
    assert sample(metrics, "tandem_kv_prompt_tokens_total", **worker, direction="sent") == 0
    staging = "tandem_kv_staging_back_pressure_total"
    assert sample(metrics, staging, **worker, event="kv_waited") == 5
    assert sample(metrics, staging, **worker, event="offer_deferred") == 3
    assert sample(metrics, staging, **worker, event="offer_refused") == 1
    # a worker whose engine failed counts in its pool but reports no figures
    assert sample(metrics, "tandem_pool_workers", pool="prefill") == 1
    assert (
        sample(metrics, "tandem_kv_cache_blocks_used", pool="prefill", worker="prefill-0") is None
    )
    assert sample(metrics, "tandem_prefix_index_lookups_total") == 1
    assert sample(metrics, "tandem_prefix_index_degraded_total") == 2
    metrics.forget_worker("decode", "decode-0")
    assert sample(metrics, "tandem_requests_running", **worker) is None


def test_metrics_are_served_over_http(metrics: ServiceMetrics) -> None:
    server, port = start_metrics_server(metrics, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    finally:
        server.shutdown()
    assert 'tandem_requests_total{code="OK"} 1.0' in text
    assert "# TYPE tandem_time_to_first_token_seconds histogram" in text


def test_the_dashboard_queries_only_metrics_that_exist(metrics: ServiceMetrics) -> None:
    exported = {s.name for family in metrics.registry.collect() for s in family.samples}
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\btandem_[a-z0-9_]+", target["expr"])
    }
    assert len(queried) >= 20
    assert queried <= exported, sorted(queried - exported)


def test_refusal_reasons_match_the_endpoints() -> None:
    from kvtransfer.pair import REFUSAL_REASONS as ENDPOINT_REASONS
    from telemetry.metrics import REFUSAL_REASONS

    assert REFUSAL_REASONS == ENDPOINT_REASONS

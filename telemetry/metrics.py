"""Prometheus metrics of a Tandem service, served by the router at /metrics.

Names follow vLLM's conventions, prefixed `tandem_`, units in the name. The router measures what
a client sees; the workers' figures come from the load reports the service collects each health
interval, so one scrape of the router covers the whole service (the catalogue:
docs/operations.md, "Metrics"). Every service has its own registry (several can live in one
process, as in the tests). Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from contracts.errors import AddressInUse
from contracts.workers import WorkerStats

# Seconds: from a cached short prompt on a GPU to a long queue on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# kvtransfer.pair.REFUSAL_REASONS (not imported: this module stays torch-free)
REFUSAL_REASONS = ("unproven", "over_limit")
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)


class ServiceMetrics:
    """The metrics of one service. The router records requests; the service feeds worker
    reports (`observe_worker`) and the placement index (`watch_index`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("tandem_time_to_first_token_seconds",
                              "Request arrival to its first token.", buckets=LATENCY_BUCKETS,
                              registry=r)  # fmt: skip
        self.itl = Histogram("tandem_inter_token_latency_seconds",
                             "Gap between consecutive streamed chunks of a request.",
                             buckets=TOKEN_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("tandem_e2e_request_latency_seconds",
                             "Request arrival to its last message.", buckets=LATENCY_BUCKETS,
                             registry=r)  # fmt: skip
        self.queue = Histogram("tandem_request_queue_time_seconds",
                               "Request arrival to the start of its prefill.",
                               buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.requests = Counter("tandem_requests", "Requests finished (both edges), by status.",
                                ["code"], registry=r)  # fmt: skip
        self.prompt_tokens = Counter("tandem_prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=r)  # fmt: skip
        self.generation_tokens = Counter("tandem_generation_tokens", "Tokens generated.",
                                         registry=r)  # fmt: skip
        self.cache_queries = Counter("tandem_prefix_cache_queries",
                                     "Prompt tokens looked up in the workers' prefix caches.",
                                     registry=r)  # fmt: skip
        self.cache_hits = Counter("tandem_prefix_cache_hits",
                                  "Prompt tokens served from the workers' prefix caches.",
                                  registry=r)  # fmt: skip
        self.admission_rejections = Counter("tandem_admission_rejections",
                                            "Requests refused by admission control.",
                                            registry=r)  # fmt: skip
        self.auth_failures = Counter("tandem_auth_failures",
                                     "Calls refused for want of a valid API key, by reason: "
                                     "missing, malformed or invalid_key.", ["reason"],
                                     registry=r)  # fmt: skip
        self.admin_refusals = Counter("tandem_admin_refusals",
                                      "Admin calls (`tandem drain-node`) refused, by reason: "
                                      "not_configured, missing, malformed, invalid_key or "
                                      "other_node.",
                                      ["reason"], registry=r)  # fmt: skip
        self.tenant_rejections = Counter("tandem_tenant_rejections",
                                         "Requests refused because their tenant was at its "
                                         "bound on requests in flight.", ["tenant"],
                                         registry=r)  # fmt: skip
        self.retried = Counter("tandem_requests_retried",
                               "Requests moved to another worker after losing theirs.",
                               registry=r)  # fmt: skip
        self.migrations = Counter(
            "tandem_request_migrations", "Streams resumed on another decode worker after "
            "losing theirs or leaving a draining one (router.failover); reason: worker_lost, "
            "unreachable or drain.", ["reason"],
            registry=r,
        )  # fmt: skip
        self.drain_moves = Counter(
            "tandem_drain_moves", "Streams moved off a draining decode worker, by how: kv "
            "(their KV shipped to another decode worker over the KV-transfer layer) or replay "
            "(prompt and sent tokens recomputed there).", ["how"],
            registry=r,
        )  # fmt: skip
        self.prefill_placement = Counter(
            "tandem_prefill_placement", "Disaggregated requests by where they were prefilled: "
            "on the prefill pool, KV shipped (remote), or on their decode worker (local); "
            "reason: the rule that chose (router.disagg.REASONS).", ["path", "reason"],
            registry=r,
        )  # fmt: skip
        self.scaling_decisions = Counter("tandem_scaling_decisions",
                                         "Autoscaling decisions taken.", ["pool", "direction"],
                                         registry=r)  # fmt: skip
        self.target_workers = Gauge("tandem_pool_target_workers",
                                    "The size the autoscaler wants each pool at.", ["pool"],
                                    registry=r)  # fmt: skip
        self._workers: dict[tuple[str, str], WorkerStats] = {}
        self._index: Callable[[], Any] | None = None
        r.register(_WorkersCollector(self))

    def observe_worker(self, pool: str, worker_id: str, stats: WorkerStats) -> None:
        """A worker's latest load report (WorkerBase.stats)."""
        self._workers[(pool, worker_id)] = stats

    def forget_worker(self, pool: str, worker_id: str) -> None:
        self._workers.pop((pool, worker_id), None)

    def watch_index(self, metrics: Callable[[], Any]) -> None:
        """Report the prefix index's counters (a callable returning its IndexMetrics)."""
        self._index = metrics

    def record_finished(
        self, code: str, usage: Any | None, e2e_s: float, ttft_s: float | None,
        queue_s: float | None, gaps_s: list[float],
    ) -> None:  # fmt: skip
        """One request's end: its status code name, usage (if it got that far), latencies."""
        self.requests.labels(code=code).inc()
        self.e2e.observe(e2e_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if queue_s is not None:
            self.queue.observe(queue_s)
        for gap in gaps_s:
            self.itl.observe(gap)
        if usage is not None:
            self.prompt_tokens.inc(usage.prompt_tokens)
            self.generation_tokens.inc(usage.completion_tokens)
            self.cache_queries.inc(usage.prompt_tokens)
            self.cache_hits.inc(usage.cached_tokens)


class _WorkersCollector(Collector):
    """Worker figures as of their last reports, read at scrape time."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        labels = ["pool", "worker"]
        g = {
            "running": GaugeMetricFamily("tandem_requests_running",
                                         "Sequences in the engine's running batch.", labels=labels),
            "waiting": GaugeMetricFamily("tandem_requests_waiting",
                                         "Requests queued in the engine.", labels=labels),
            "used": GaugeMetricFamily("tandem_kv_cache_blocks_used",
                                      "KV-cache blocks in use.", labels=labels),
            "free": GaugeMetricFamily("tandem_kv_cache_blocks_free",
                                      "KV-cache blocks free (cached prefixes included).",
                                      labels=labels),
            "usage": GaugeMetricFamily("tandem_kv_cache_usage_ratio",
                                       "Fraction of KV-cache blocks in use.", labels=labels),
        }  # fmt: skip
        c = {
            "preemptions": CounterMetricFamily("tandem_preemptions", "Sequences preempted.",
                                               labels=labels),
            "failures": CounterMetricFamily("tandem_kv_transfer_failures",
                                            "KV transfers failed or aborted.", labels=labels),
            "leases": CounterMetricFamily("tandem_kv_transfer_leases_expired",
                                          "KV transfers whose sender lease expired.",
                                          labels=labels),
            "computed": CounterMetricFamily("tandem_prompt_tokens_computed",
                                            "Prompt tokens the worker's engine ran (prefilled).",
                                            labels=labels),
        }  # fmt: skip
        prompt_kv = CounterMetricFamily(
            "tandem_kv_prompt_tokens", "Prompt tokens of KV shipped (sent), attached after a "
            "transfer (received), or taken from a decode worker's own prefix cache instead of "
            "shipped (reused).", labels=[*labels, "direction"],
        )  # fmt: skip
        refused = CounterMetricFamily(
            "tandem_kv_pairs_refused", "KV pair connections refused: the peer did not prove the "
            "cluster secret in time (unproven), or came over the limits on unauthenticated "
            "connections (over_limit).", labels=[*labels, "reason"],
        )  # fmt: skip
        transfer_bytes = CounterMetricFamily("tandem_kv_transfer_bytes", "KV bytes moved.",
                                             labels=[*labels, "direction"])  # fmt: skip
        recomputed = CounterMetricFamily(
            "tandem_kv_prompts_recomputed", "Prompts a decode worker computed again because "
            "their KV did not come (no_room, failed, aborted, timeout, pair_failed).",
            labels=[*labels, "reason"],
        )  # fmt: skip
        back_pressure = CounterMetricFamily(
            "tandem_kv_staging_back_pressure", "A bounded transfer staging region's "
            "back-pressure (private-KV tensor parallelism): kept KV that waited for staging "
            "blocks before it shipped (kv_waited), offers that found no room and waited "
            "(offer_deferred), offers refused for no room after waiting (offer_refused).",
            labels=[*labels, "event"],
        )  # fmt: skip
        transfer_time = SummaryMetricFamily("tandem_kv_transfer_seconds",
                                            "Offer to end of completed KV transfers.",
                                            labels=labels)  # fmt: skip
        pools: dict[str, int] = {}
        for (pool, worker), stats in sorted(self.metrics._workers.items()):
            pools[pool] = pools.get(pool, 0) + 1
            if stats.failure is not None:
                continue
            values = [pool, worker]
            total, free = stats.num_blocks, stats.num_free_blocks
            g["running"].add_metric(values, stats.num_running)
            g["waiting"].add_metric(values, stats.num_waiting)
            g["used"].add_metric(values, total - free)
            g["free"].add_metric(values, free)
            g["usage"].add_metric(values, (total - free) / total if total else 0.0)
            c["preemptions"].add_metric(values, stats.num_preemptions)
            kv = stats.kv
            c["failures"].add_metric(values, kv.transfers_failed)
            c["leases"].add_metric(values, kv.leases_expired)
            for reason in REFUSAL_REASONS:
                refused.add_metric([*values, reason], kv.pairs_refused_by_reason.get(reason, 0))
            transfer_bytes.add_metric([*values, "sent"], kv.bytes_sent)
            transfer_bytes.add_metric([*values, "received"], kv.bytes_received)
            transfer_time.add_metric(values, kv.transfers_completed, kv.transfer_seconds)
            c["computed"].add_metric(values, stats.num_prompt_tokens_computed)
            for direction in ("sent", "received", "reused"):
                prompt_kv.add_metric([*values, direction], getattr(kv, f"tokens_{direction}"))
            for reason, count in sorted(kv.prompts_recomputed_by_reason.items()):
                recomputed.add_metric([*values, reason], count)
            back_pressure.add_metric([*values, "kv_waited"], kv.kv_staging_waits)
            back_pressure.add_metric([*values, "offer_deferred"], kv.offers_deferred)
            back_pressure.add_metric([*values, "offer_refused"], kv.offers_refused_for_room)
        yield from g.values()
        yield from c.values()
        yield prompt_kv
        yield refused
        yield transfer_bytes
        yield recomputed
        yield back_pressure
        yield transfer_time
        workers = GaugeMetricFamily("tandem_pool_workers", "Workers in each pool.",
                                    labels=["pool"])  # fmt: skip
        for pool, count in sorted(pools.items()):
            workers.add_metric([pool], count)
        yield workers
        index = self.metrics._index() if self.metrics._index is not None else None
        if index is not None:
            yield CounterMetricFamily(
                "tandem_prefix_index_lookups",
                "Prefix-index lookups answered.",
                value=index.num_lookups,
            )
            yield CounterMetricFamily("tandem_prefix_index_degraded",
                                      "Placements by load alone: the index did not answer in time.",
                                      value=index.num_degraded)  # fmt: skip


def start_metrics_server(metrics: ServiceMetrics, host: str, port: int) -> tuple[Any, int]:
    """Serve /metrics on host:port (0: any free port) from a daemon thread; (server, port).
    Stop it with `server.shutdown()`. Raises AddressInUse when another process holds the port."""
    import errno

    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise AddressInUse(
                f"--metrics-port {port}: {host}:{port} is already in use by another process; "
                "choose another port (0: any free one)"
            ) from None
        raise
    return server, int(server.server_port)

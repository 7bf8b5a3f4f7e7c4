"""Assembling the service: a Ray cluster, worker pools of Ray actors, the gRPC router.

`Service(ServiceConfig(...)).start()` starts or joins Ray, starts the pools, waits until every
worker has loaded its model, then serves gRPC; `stop()` stops accepting, finishes or cancels
streams, kills the actors and leaves Ray if it started it. Colocated: `num_workers`
EngineWorkers, each prefilling and decoding its own requests (the baseline of every
disaggregation claim). Disaggregated: `num_prefill_workers` PrefillWorkers and
`num_decode_workers` EngineWorkers, every prefill worker paired with every decode worker for KV
transfer. The actor modules are imported lazily; torch loads in the workers' processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from cluster.autoscaler import AutoscalingConfig
from cluster.membership import PoolMembership
from cluster.node_drain import NodeDrains
from cluster.ray_start import init_ray
from cluster.scaling import Autoscaler
from cluster.workers import RayWorkerClient, actor_of
from contracts.drain import NodeDrainReport
from contracts.errors import TensorParallelShapeError
from contracts.workers import WorkerInfo
from engine.config import EngineConfig
from engine.loader import describe_model, resolve_model
from kvtransfer.handshake import SECRET_ENV, SECRET_FILE_ENV
from kvtransfer.network import KVNetworkConfig
from prefix_cache.index import IndexConfig, LocalPrefixIndex, PrefixLookup, make_prefix_index
from router.admin import AdminServicer
from router.admission import Admission, AdmissionLimits
from router.auth import ApiKeys, Guard
from router.disagg import DisaggPolicy
from router.failover import FailoverConfig
from router.interceptor import AuthInterceptor
from router.placement import Member
from router.requests import ServedModel, prompt_chars_limit
from router.server import ServingGate, TandemServicer, set_serving, start_server
from router.tls import TlsConfig
from telemetry.metrics import ServiceMetrics, start_metrics_server
from telemetry.tracing import TracingConfig, setup_tracing, shutdown_tracing

logger = logging.getLogger(__name__)

MODES = ("colocated", "disaggregated")
ACTOR_NAMESPACE = "tandem"  # the Ray namespace of the worker actors' names


@dataclass(frozen=True)
class ServiceConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    prefill_engine: EngineConfig | None = None  # the disaggregated prefill pool's; None: engine
    num_workers: int = 1  # colocated mode
    mode: str = "colocated"
    num_prefill_workers: int = 1  # disaggregated mode
    num_decode_workers: int = 1
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (see Service.port)
    http_port: int | None = None  # the OpenAI-compatible HTTP edge (router.http); 0: any free
    address: str | None = None  # a Ray cluster to join; None: start a local one
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # Custom Ray resources each worker of a pool asks for, e.g. {"tandem_prefill": 1} to keep
    # the pool on nodes that offer it (the Helm chart's worker groups do); colocated: decode.
    prefill_resources: dict[str, float] = field(default_factory=dict)
    decode_resources: dict[str, float] = field(default_factory=dict)
    worker_start_timeout_s: float = 300.0
    health_interval_s: float = 1.0  # how often every worker is checked for life
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)  # work in flight
    # The global prefix-cache index (redis_url None: kept in the router, drained from workers
    # every index_drain_interval_s) and how much a cached prompt token weighs in placement.
    index: IndexConfig = field(default_factory=IndexConfig)
    cache_weight: float = 1.0
    # Disaggregated mode: where each request is prefilled (router.disagg; default: always on the
    # prefill pool; `tandem serve` defaults to auto). Colocated mode takes only the default.
    disagg: DisaggPolicy = field(default_factory=DisaggPolicy)
    # Streams whose decode worker is lost resume on another by replay (router.failover).
    failover: FailoverConfig = field(default_factory=FailoverConfig)
    index_drain_interval_s: float = 0.1
    metrics_port: int | None = None  # Prometheus /metrics on host:metrics_port (0: any free)
    tracing: TracingConfig = field(default_factory=TracingConfig)  # spans to an OTLP collector
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    verbose: bool = False  # Ray's start-up banners and INFO logs in this process's output
    # Where workers' KV endpoints listen (interface, port range); see kvtransfer.network.
    kv_network: KVNetworkConfig = field(default_factory=KVNetworkConfig)
    # Who may call (router.auth; None: anyone, for local use) and the API's TLS (router.tls).
    api_keys: ApiKeys | None = None
    tls: TlsConfig = field(default_factory=TlsConfig)
    # Who may call the Admin service (router.admin: DrainNode); None: it refuses every call.
    admin_keys: ApiKeys | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}")
        for name in ("num_workers", "num_prefill_workers", "num_decode_workers"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        for name in ("prefill_resources", "decode_resources"):
            for resource, amount in getattr(self, name).items():
                if (
                    not isinstance(resource, str)
                    or not isinstance(amount, (int, float))
                    or (amount <= 0)
                ):
                    raise ValueError(
                        f"{name}: {resource!r}={amount!r}: use a resource name and an amount > 0"
                    )
        if not self.cache_weight >= 0:
            raise ValueError(f"cache_weight={self.cache_weight!r} must be >= 0")
        if not isinstance(self.disagg, DisaggPolicy):
            raise ValueError(f"disagg={self.disagg!r} must be a router.disagg.DisaggPolicy")
        if not isinstance(self.failover, FailoverConfig):
            raise ValueError(f"failover={self.failover!r} must be a router.failover.FailoverConfig")
        if self.mode == "colocated" and self.disagg != DisaggPolicy():
            raise ValueError(
                f"disagg={self.disagg!r} applies to disaggregated mode only (colocated "
                "workers always prefill their own requests)"
            )
        if self.http_port is not None and (
            type(self.http_port) is not int or not 0 <= self.http_port <= 65535
        ):
            raise ValueError(f"http_port={self.http_port!r} must be a port number (0: any free)")
        if not 0 < self.index_drain_interval_s <= 10:
            raise ValueError(
                f"index_drain_interval_s={self.index_drain_interval_s!r} must be in (0, 10]"
            )


@dataclass(frozen=True, slots=True)
class DrainReport:
    """How a drain went (Service.drain_worker): whether the worker left empty (False: the
    timeout retired it busy), and how long its phases took, in seconds (0 where not run)."""

    left_empty: bool
    pairing_s: float = 0.0  # KV pairs formed to the other decode workers (move_kv_on_drain)
    moving_s: float = 0.0  # every stream moved off (RequestCore.migrate_off)
    landing_s: float = 0.0  # the moved KV landed (EngineWorker.finish_moves)


class Service:
    """The running service. It owns the pools' membership (cluster.membership: who is in
    each pool, replaced, added or drained here); the router places requests on them.
    `workers` and `prefill_workers` are the actors of the current members."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.pools: dict[str, PoolMembership] = {}  # "decode" (colocated: the one), "prefill"
        self.port: int | None = None
        self.http_port: int | None = None  # bound, when serving HTTP
        self._http: Any = None  # router.http.HttpServer
        self._server: Any = None
        self._health: Any = None
        self._gate: ServingGate | None = None
        self._servicer: TandemServicer | None = None
        self._actor_class: Any = None
        self._prefill_class: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._next_number = {"decode": 0, "prefill": 0}  # ids of workers added later
        self.prefix_index: PrefixLookup | None = None
        self.metrics = ServiceMetrics()
        self.guard = self._guard()  # every edge (gRPC, HTTP) checks callers with it
        self.metrics_port: int | None = None  # bound, when serving /metrics
        self._metrics_server: Any = None
        self._started_ray = False
        self.num_replaced = 0  # workers replaced after dying
        self.node_drains = NodeDrains()  # operators' node drains (cluster.node_drain)

    @property
    def workers(self) -> list[Any]:
        """Decode (or colocated) workers' actors."""
        return self._actors("decode")

    def _guard(self) -> Guard | None:
        """API keys and tenants' bounds (router.auth), counted in metrics; None when off."""
        if self.config.api_keys is None:
            return None
        metrics = self.metrics
        return Guard(
            self.config.api_keys,
            on_failure=lambda reason: metrics.auth_failures.labels(reason=reason).inc(),
            on_refused=lambda tenant: metrics.tenant_rejections.labels(tenant=tenant).inc(),
        )

    @property
    def gate(self) -> ServingGate | None:
        """The server's gate (drains on shutdown); None before start."""
        return self._gate

    @property
    def prefill_workers(self) -> list[Any]:
        return self._actors("prefill")

    def _actors(self, pool: str) -> list[Any]:
        members = self.pools[pool].members() if pool in self.pools else ()
        return [actor_of(m) for m in members]

    @property
    def disaggregated(self) -> bool:
        return self.config.mode == "disaggregated"

    async def start(self) -> None:
        """Serve at once (health NOT_SERVING), load the pools, then report SERVING. On any
        failure everything started so far is stopped before the error propagates."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        import ray

        from decode_worker.actor import EngineWorker

        config = self.config
        self._check_tensor_parallel()
        setup_tracing(config.tracing, "router")
        interceptors = [AuthInterceptor(self.guard)] if self.guard is not None else []
        admin = AdminServicer(
            config.admin_keys,
            self.drain_node,
            on_refused=lambda reason: self.metrics.admin_refusals.labels(reason=reason).inc(),
        )
        self._server, self.port, gate, self._health = await start_server(
            config.host, config.port, config.tls, interceptors, admin
        )
        self._gate = gate
        if config.http_port is not None:  # the same gate: refused while loading, drained
            from router.http import start_http_server

            self._http = await start_http_server(
                config.host, config.http_port, gate, self.guard, config.tls
            )
            self.http_port = self._http.port
        if config.metrics_port is not None:
            self._metrics_server, self.metrics_port = start_metrics_server(
                self.metrics, config.host, config.metrics_port
            )
        if not ray.is_initialized():
            # A local cluster gets room for every worker even on a small machine (they share
            # its cores); a cluster joined by address brings its own resources.
            local_cpus = None if config.address else self._local_cpus()
            if not config.verbose:
                quiet_ray_startup()
            level = logging.INFO if config.verbose else logging.ERROR
            secret_kept = kv_secret_inherited(local=config.address is None)
            with _signal_handlers_kept(), secret_kept:  # ray.init: SIGTERM would exit at once
                # ray.init, retrying Ray's node start-up timeout (cluster.ray_start)
                init_ray(address=config.address, num_cpus=local_cpus, include_dashboard=False,
                         log_to_driver=False, logging_level=level)  # fmt: skip
            self._started_ray = True
        if config.address is not None:
            warn_loopback_addresses(config)
        # Async actor: up to 1,000 concurrent method calls by default, one engine thread.
        cpus, gpus = config.cpus_per_worker, config.gpus_per_worker
        runtime_env = kv_secret_runtime_env()
        self._actor_class = ray.remote(
            num_cpus=cpus, num_gpus=gpus, resources=dict(config.decode_resources),
            runtime_env=runtime_env,
        )(EngineWorker)  # fmt: skip
        sizes = {"decode": config.num_decode_workers if self.disaggregated else config.num_workers}
        if self.disaggregated:
            from prefill_worker.actor import PrefillWorker

            self._prefill_class = ray.remote(
                num_cpus=cpus, num_gpus=gpus, resources=dict(config.prefill_resources),
                runtime_env=runtime_env,
            )(PrefillWorker)  # fmt: skip
            sizes["prefill"] = config.num_prefill_workers
        started = {pool: [self._spawn(pool) for _ in range(n)] for pool, n in sizes.items()}
        try:
            infos = {
                pool: await asyncio.wait_for(
                    asyncio.gather(*(w.model_info.remote() for w, _ in spawned)),
                    config.worker_start_timeout_s,
                )
                for pool, spawned in started.items()
            }
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"the workers did not load within {config.worker_start_timeout_s:.0f} s; the "
                f"Ray cluster has {ray.available_resources()} free for workers of "
                f"{cpus} CPU and {gpus} GPU each"
            ) from None
        finally:  # whatever started is stopped by stop() if this fails
            for pool, spawned in started.items():
                self.pools[pool] = PoolMembership(pool)
                for actor, worker_id in spawned:
                    self.pools[pool].add(RayWorkerClient(actor, worker_id))
        for pool, pool_infos in infos.items():
            for member, info in zip(self.pools[pool].members(), pool_infos, strict=True):
                member.index_key = info.index_key
        if self.disaggregated:
            await self._form_pairs()
        model = served_model(config.engine.model, infos["decode"][0])
        self.prefix_index = make_prefix_index(config.index)
        self._servicer = TandemServicer(
            model,
            self.pools["decode"],
            self.pools.get("prefill"),
            Admission(config.admission),
            self.prefix_index,
            self.metrics,
            cache_weight=config.cache_weight,
            disagg=config.disagg,
            failover=config.failover,
        )
        index = self.prefix_index
        self.metrics.watch_index(lambda: index.metrics)
        gate.open(self._servicer)
        await set_serving(self._health, self._pool_names(), serving=True)
        self._tasks.append(asyncio.create_task(self._watch()))
        if isinstance(self.prefix_index, LocalPrefixIndex):
            self._tasks.append(asyncio.create_task(self._drain_index(self.prefix_index)))
        if config.autoscaling.enabled:
            self._tasks.append(asyncio.create_task(Autoscaler(self).run()))
        logger.info("serving %s on %s:%d with %s workers", model.model_id, config.host,
                    self.port, {p: len(pool) for p, pool in self.pools.items()})  # fmt: skip

    async def shutdown(self, grace_s: float) -> int:
        """Stop gracefully: health NOT_SERVING and new requests refused (UNAVAILABLE) at once,
        requests in flight given up to `grace_s` to finish, the rest ended with UNAVAILABLE
        naming the grace period; then `stop()`. Returns how many requests were cut."""
        num_cut = 0
        if self._gate is not None and self._server is not None:
            await set_serving(self._health, self._pool_names(), serving=False)
            self._gate.close("shutting down: this server takes no new requests")
            num_cut = await self._gate.wait_idle(grace_s)
            if num_cut:
                logger.warning("shutdown: %d requests still in flight after the %.0f s grace "
                               "period; cancelling them", num_cut, grace_s)  # fmt: skip
                self._gate.cut(f"shutting down: the request did not finish within the "
                               f"{grace_s:g} s shutdown grace period")  # fmt: skip
                await self._gate.wait_idle(5.0)
        await self.stop()
        return num_cut

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop now: streams still open get `grace_s` before grpc cancels them."""
        import ray

        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self.node_drains.cancel()  # a replacement still starting is killed (start_worker)
        if self._server is not None:
            await set_serving(self._health, self._pool_names(), serving=False)
            await self._server.stop(grace_s)
            self._server = None
        if self._http is not None:
            await self._http.stop(grace_s)
            self._http = None
        if self._servicer is not None:
            self._servicer.outputs.stop()
        workers = self.workers + self.prefill_workers
        if workers:  # a clean stop takes their entries out of the index; then they go
            await asyncio.wait([asyncio.ensure_future(w.shutdown.remote()) for w in workers],
                               timeout=grace_s)  # fmt: skip
        for worker in workers:
            ray.kill(worker)
        self.pools = {}
        if self.prefix_index is not None:
            await self.prefix_index.close()
            self.prefix_index = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        shutdown_tracing()  # flush what is queued, bounded by the export timeout
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def _local_cpus(self) -> int:
        config = self.config
        if self.disaggregated:
            num_workers = config.num_prefill_workers + config.num_decode_workers
            scaling = config.autoscaling
            if scaling.enabled:
                num_workers = max(num_workers, scaling.prefill.max_workers
                                  + scaling.decode.max_workers)  # fmt: skip
        else:
            num_workers = config.num_workers
            if config.autoscaling.enabled:
                num_workers = max(num_workers, config.autoscaling.decode.max_workers)
        ranks = max(self._engine(p).tensor_parallel_size for p in ("prefill", "decode"))
        needed = math.ceil(num_workers * ranks * config.cpus_per_worker)
        return max(os.cpu_count() or 1, needed)

    def _spawn(self, pool: str, worker_id: str | None = None) -> tuple[Any, str]:
        """A new worker actor for `pool` and its id: `worker_id` (a replacement takes over the
        dead one's, with a new epoch in the index) or the pool's next."""
        if worker_id is None:
            number = self._next_number[pool]
            self._next_number[pool] += 1
            name = pool if self.disaggregated else "worker"
            worker_id = f"{name}-{number}"
        config = self.config
        tracing, net = config.tracing, config.kv_network
        engine = self._engine(pool)
        actor_class = self._prefill_class if pool == "prefill" else self._actor_class
        # named, so an operator's tools (or a test's driver) find it: `ray list actors`
        options: dict[str, Any] = {"name": f"{worker_id}-{uuid.uuid4().hex[:8]}",
                                   "namespace": ACTOR_NAMESPACE}  # fmt: skip
        if engine.tensor_parallel_size > 1:  # its ranks are the actor's child processes
            options |= self._resources(pool)
        # every worker publishes its cache: decode workers' too (decode-side prefix reuse)
        actor = actor_class.options(**options).remote(engine, worker_id, config.index, tracing, net)
        return actor, worker_id

    def _check_tensor_parallel(self) -> None:
        """Refuse a pool whose tensor-parallel size does not divide the model, before anything
        starts: TensorParallelShapeError naming the pool and the sizes."""
        from engine.sharding import check_divisible

        for pool in ("prefill", "decode") if self.disaggregated else ("decode",):
            engine = self._engine(pool)
            if engine.tensor_parallel_size > 1:
                description, _ = describe_model(resolve_model(engine.model))
                try:
                    check_divisible(description.config, engine.tensor_parallel_size)
                except TensorParallelShapeError as e:
                    raise TensorParallelShapeError(f"the {pool} pool: {e}") from None

    def _engine(self, pool: str) -> EngineConfig:
        """The engine config of `pool`'s workers; disaggregated pools' ship and receive KV
        (kv_transfer: under private-KV tensor parallelism rank 0 keeps a staging region)."""
        engine = self.config.engine
        if pool == "prefill":
            engine = self.config.prefill_engine or engine
        return replace(engine, kv_transfer=True) if self.disaggregated else engine

    def _resources(self, pool: str) -> dict[str, float]:
        """A worker's Ray resources: a CPU (or GPU) share per tensor-parallel rank. One actor
        holds them all, so Ray keeps the ranks on one node and its GPUs are the ranks'."""
        size = self._engine(pool).tensor_parallel_size
        cpus, gpus = self.config.cpus_per_worker, self.config.gpus_per_worker
        return {"num_cpus": cpus * size, "num_gpus": gpus * size}

    async def _drain_index(self, index: LocalPrefixIndex) -> None:
        """Without Redis: pull every worker's cache changes into the router's index (decode
        workers' too: decode-side prefix reuse). A worker that does not answer is skipped (its
        entries expire if it stays silent)."""
        while True:
            await asyncio.sleep(self.config.index_drain_interval_s)
            calls = [
                asyncio.wait_for(
                    actor_of(m).drain_cache_events.remote(index.next_drain_seq(m.worker_id)), 5.0
                )
                for pool in self.pools.values()
                for m in pool.members()
            ]
            for batch in await asyncio.gather(*calls, return_exceptions=True):
                if not isinstance(batch, BaseException):
                    index.apply(batch)

    def _pool_names(self) -> list[str]:
        return ["prefill", "decode"] if self.disaggregated else ["decode"]

    async def _form_pairs(self) -> None:
        """A KV-transfer pair between every prefill and every decode worker."""
        decode, prefill = self.pools["decode"].members(), self.pools["prefill"].members()
        addresses = await asyncio.gather(*(actor_of(m).open_endpoint.remote() for m in decode))
        await asyncio.gather(
            *(
                self._connect(actor_of(p), p.worker_id, d.worker_id, address)
                for p in prefill
                for d, address in zip(decode, addresses, strict=True)
            )
        )

    async def _pair_new(self, pool: str, worker: Any, worker_id: str) -> None:
        """Pair a new worker with every live worker of the other pool (disaggregated mode). A
        peer found dead is skipped: its own replacement pairs with this one once this one is
        in the pool (pairing with it would fail every replacement while both pools have a dead
        member, and neither pool would come back)."""
        if not self.disaggregated:
            return
        if pool == "decode":
            address = await worker.open_endpoint.remote()
            prefill = self.pools["prefill"].members()
            results = await asyncio.gather(
                *(self._connect(actor_of(p), p.worker_id, worker_id, address) for p in prefill),
                return_exceptions=True,
            )
            _raise_unless_peers_died(zip(prefill, results, strict=True))
        else:
            decode = self.pools["decode"].members()
            addresses = await asyncio.gather(
                *(actor_of(d).open_endpoint.remote() for d in decode), return_exceptions=True
            )
            live = _raise_unless_peers_died(zip(decode, addresses, strict=True))
            await asyncio.gather(
                *(self._connect(worker, worker_id, d.worker_id, address) for d, address in live)
            )

    async def _connect(self, prefill: Any, prefill_id: str, decode_id: str, address: Any) -> None:
        """Pair a prefill worker with the decode worker `decode_id` at `address`."""
        key = f"{prefill_id}-{decode_id}-{uuid.uuid4().hex[:8]}"  # single-use, per formation
        await prefill.connect.remote(decode_id, address, key)

    async def _watch(self) -> None:
        """Check every worker each interval: feed its load to placement and metrics, and
        replace it if it died or its engine stopped, so each pool returns to size on its own.
        A slow answer is not death (a long prefill step delays it); only Ray's verdict, or the
        worker's own report of a failed engine, is. A dead worker's replacement starts as soon
        as its own verdict is in, not after a busy sibling's slow answer (up to 5 intervals);
        replacements still start one at a time, so the later one pairs with the earlier one."""
        one_at_a_time = asyncio.Lock()
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            checks = [(name, m) for name, pool in self.pools.items() for m in pool.members()]
            await asyncio.gather(*(self._check_and_replace(*c, one_at_a_time) for c in checks))

    async def _check_and_replace(
        self, pool: str, member: Member, one_at_a_time: asyncio.Lock
    ) -> None:
        """Check `member` (`_check`) and, if it must go, replace it holding `one_at_a_time`."""
        if not await self._check(pool, member):
            return
        async with one_at_a_time:
            try:
                await self._replace(pool, member)
            except Exception:  # try again at the next check
                logger.exception("replacing %s worker %s failed", pool, member.worker_id)

    async def _check(self, pool: str, member: Member) -> bool:
        """Whether `member` must be replaced; on the way, its load goes to placement and
        metrics."""
        import ray

        worker = actor_of(member)
        try:
            stats = await asyncio.wait_for(worker.stats.remote(), self.config.health_interval_s * 5)
        except asyncio.TimeoutError:
            return False
        except ray.exceptions.RayActorError:
            return True
        if stats.failure is not None:
            logger.error("worker %s: its engine failed (%s): killing it", member.worker_id,
                         stats.failure)  # fmt: skip
            ray.kill(worker, no_restart=True)
            return True
        if pool in self.pools:
            self.pools[pool].observe(member, stats)
        self.metrics.observe_worker(pool, member.worker_id, stats)
        return False

    async def _replace(self, pool: str, dead: Member) -> None:
        """Start a replacement under the same id and, in disaggregated mode, re-form its KV
        pairs before it takes requests."""
        if self._servicer is None or dead not in self.pools[pool]:
            return  # already replaced, or removed by scaling
        logger.warning("%s worker %s died; starting a replacement", pool, dead.worker_id)
        client, info = await self.start_worker(pool, dead.worker_id)
        self.pools[pool].replace(dead, client, info.index_key)  # now it takes requests
        self.num_replaced += 1

    async def start_worker(
        self, pool: str, worker_id: str | None = None
    ) -> tuple[RayWorkerClient, WorkerInfo]:
        """A new worker for `pool` (under `worker_id`, or the pool's next id), loaded and, in
        disaggregated mode, paired with every worker of the other pool; not in the pool yet.
        A worker that fails to start is killed before the error propagates. On a Ray cluster
        with an autoscaler (KubeRay), a worker that does not fit makes Ray ask for a node."""
        import ray

        new, worker_id = self._spawn(pool, worker_id)
        try:
            info = await asyncio.wait_for(
                new.model_info.remote(), self.config.worker_start_timeout_s
            )
            await self._pair_new(pool, new, worker_id)
        except BaseException:  # whoever asked tries again later: this one must not linger
            ray.kill(new)
            raise
        return RayWorkerClient(new, worker_id), info

    async def drain_worker(self, pool: str, member: Member, timeout_s: float) -> DrainReport:
        """Take `member` out of `pool` without losing a request: nothing new is placed on it;
        a decode worker's streams move to the pool's other workers at once, with their KV
        (failover.move_kv_on_drain: paired for it here; the KV lands before it stops) or by
        replay (RequestCore.migrate_off; with failover.migrate_on_drain and another placeable
        worker), else what it holds runs to its end (a prefill worker's prefills finish and the
        KV it pinned for them is shipped); at most `timeout_s`, then it is retired
        (a request still there is lost with it: a decode stream resumes elsewhere by
        failover, within --max-migrations). Returns how it went."""
        members = self.pools[pool]
        members.drain(member)
        logger.info("%s worker %s draining", pool, member.worker_id)
        deadline = time.monotonic() + timeout_s
        servicer = self._servicer
        actor = actor_of(member)
        moves_done = True
        phases = [time.monotonic()] * 4  # started, paired, moved off, landed
        if pool == "decode" and servicer is not None and servicer.failover.migrate_on_drain:
            move_kv = servicer.failover.move_kv_on_drain
            if move_kv:
                await self._pair_for_moves(member)
            phases[1] = time.monotonic()
            await servicer.migrate_off(member, timeout_s, move_kv=move_kv)
            phases[2] = phases[3] = time.monotonic()
            if move_kv:  # the KV it ships must land before it stops
                left_s = max(deadline - time.monotonic(), 0.0)
                moves_done = await actor.finish_moves.remote(left_s)
                phases[3] = time.monotonic()
        pairing_s, moving_s, landing_s = (phases[i + 1] - phases[i] for i in range(3))
        emptied = False
        while time.monotonic() < deadline:
            if member not in members:  # died and was replaced meanwhile: nothing to drain
                return DrainReport(True, pairing_s, moving_s, landing_s)
            stats = await actor.stats.remote()
            # a prefill worker's KV still pinned for a transfer must land before it stops
            shipping = pool == "prefill" and stats.num_free_blocks < stats.num_blocks
            if member.load.in_flight == 0 and not stats.num_requests and not shipping:
                emptied = True
                break
            await asyncio.sleep(0.05)
        else:
            logger.warning("%s worker %s still busy after the drain timeout", pool,
                           member.worker_id)  # fmt: skip
        await self.retire_worker(pool, member)
        logger.info("%s worker %s left the pool", pool, member.worker_id)
        return DrainReport(emptied and moves_done, pairing_s, moving_s, landing_s)

    async def drain_node(self, node_ip: str, timeout_s: float) -> NodeDrainReport:
        """Drain every worker of both pools on the Ray node at `node_ip` (an operator, a
        worker pod's preStop): Ray schedules nothing more there, replacements start on other
        nodes, each worker drains as in `drain_worker`, all at once, within `timeout_s`
        (cluster.node_drain). Idempotent per node. Raises InvalidRequest (a malformed address
        or timeout), WorkerUnavailable (not serving yet), UnknownNode, NodeNotDrainable
        (AmbiguousNode: several nodes have that address), NodeDrainTimedOut."""
        from cluster.node_drain import drain_node

        return await drain_node(self, node_ip, timeout_s)

    async def _pair_for_moves(self, leaving: Member) -> None:
        """Pair draining decode worker `leaving`, as the sender, with every other placeable
        decode worker, for its running requests' KV to move there (issue 22.3). Formed per
        drain, not at start: drains are rare, and a standing pair between every two decode
        workers would hold a gloo group, its threads and sockets each. A peer that fails to
        pair gets no moves (its streams are replayed)."""
        peers = [m for m in self.pools["decode"].members() if m is not leaving and m.placeable]
        sender = actor_of(leaving)

        async def pair(peer: Member) -> None:
            address = await actor_of(peer).open_endpoint.remote()
            key = f"{leaving.worker_id}-{peer.worker_id}-{uuid.uuid4().hex[:8]}"
            await sender.connect.remote(peer.worker_id, address, key)

        results = await asyncio.gather(*(pair(p) for p in peers), return_exceptions=True)
        for peer, result in zip(peers, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("no KV pair from draining worker %s to %s (%s): its streams "
                               "there are replayed", leaving.worker_id, peer.worker_id,
                               result)  # fmt: skip

    async def retire_worker(self, pool: str, member: Member) -> None:
        """Take a drained member out: unpair it, forget it in metrics and the index, stop it."""
        import ray

        worker, worker_id = actor_of(member), member.worker_id
        if pool == "decode" and self.disaggregated:  # a prefill worker gone meanwhile: logged
            prefill = self.prefill_workers
            results = await asyncio.gather(
                *(p.disconnect.remote(worker_id) for p in prefill), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    logger.warning("unpairing retired decode worker %s from a prefill worker "
                                   "failed: %r", worker_id, result)  # fmt: skip
        self.forget_worker(pool, member)
        try:
            await asyncio.wait_for(worker.shutdown.remote(), 10)
        finally:
            ray.kill(worker)

    def forget_worker(self, pool: str, member: Member) -> None:
        """Take a member out of its pool, metrics and the index (it is being stopped)."""
        self.pools[pool].remove(member)
        self.metrics.forget_worker(pool, member.worker_id)
        if isinstance(self.prefix_index, LocalPrefixIndex):
            self.prefix_index.forget(member.worker_id)

    def recent_latencies(self) -> dict[str, list[float]]:
        """The router's recent TTFTs and inter-token gaps (autoscaling signals)."""
        return {} if self._servicer is None else self._servicer.recent_latencies()


def warn_loopback_addresses(config: ServiceConfig) -> None:
    """Workers on other nodes resolve the Redis and OTLP addresses handed to them on their own
    node: a loopback address there is not this host's. Warn (a one-node cluster may mean it)."""
    import ipaddress
    from urllib.parse import urlsplit

    redis_url, otlp = config.index.redis_url, config.tracing.otlp_endpoint
    named = {
        "--redis-url": urlsplit(redis_url).hostname if redis_url else None,
        "--otlp-endpoint": otlp.rpartition(":")[0] if otlp else None,
    }
    for flag, host in named.items():
        if host is None:
            continue
        is_loopback = host == "localhost"
        with contextlib.suppress(ValueError):
            is_loopback = is_loopback or ipaddress.ip_address(host.strip("[]")).is_loopback
        if is_loopback:
            logger.warning("%s names %s, a loopback address: workers on other nodes of the Ray "
                           "cluster would look for it on their own node", flag, host)  # fmt: skip


def _raise_unless_peers_died(results: Any) -> list[tuple[Member, Any]]:
    """The (peer, result) pairs of peers that answered; a peer whose actor died is logged and
    left out; any other error is raised."""
    import ray

    answered = []
    for member, result in results:
        if isinstance(result, ray.exceptions.RayActorError):
            logger.warning("not pairing with %s: it died (%s); its replacement will pair",
                           member.worker_id, type(result).__name__)  # fmt: skip
        elif isinstance(result, BaseException):
            raise result
        else:
            answered.append((member, result))
    return answered


@contextlib.contextmanager
def kv_secret_inherited(local: bool) -> Iterator[None]:
    """Around the ray.init that starts a local cluster (`local`): make sure its raylet, and so
    every worker it starts, inherits a KV cluster secret (kvtransfer.handshake). One set here
    (TANDEM_KV_SECRET or TANDEM_KV_SECRET_FILE) is inherited as is; else one is made up for
    this cluster and put in this process's environment for the start only. The value never
    goes into a Ray runtime_env: Ray keeps those in its GCS (any client can list them) and
    logs them. A cluster joined by address brings its own: each node's environment (the Helm
    chart mounts a Secret and sets TANDEM_KV_SECRET_FILE)."""
    if not local or os.environ.get(SECRET_ENV) or os.environ.get(SECRET_FILE_ENV):
        yield
        return
    logger.info("no %s or %s set: KV pairs use a secret made up for this local cluster",
                SECRET_ENV, SECRET_FILE_ENV)  # fmt: skip
    os.environ[SECRET_ENV] = secrets.token_hex(32)
    try:
        yield
    finally:
        os.environ.pop(SECRET_ENV, None)


def kv_secret_runtime_env() -> dict[str, Any]:
    """The runtime_env of the workers: at most the PATH of the secret file named here
    (TANDEM_KV_SECRET_FILE; each node must hold the file there), never a secret's value."""
    path = os.environ.get(SECRET_FILE_ENV)
    return {"env_vars": {SECRET_FILE_ENV: path}} if path else {}


def served_model(model_spec: str | None, info: WorkerInfo) -> ServedModel:
    """The router's view of the workers' model: their limits, and a tokenizer of its own
    (read from the same model files, torch-free)."""
    description, _ = describe_model(resolve_model(model_spec))
    tokenizer = description.tokenizer
    return ServedModel(
        model_id=info.model_id,
        vocab_size=info.vocab_size,
        max_model_len=info.max_model_len,
        tokenizer=tokenizer,
        block_size=info.block_size,
        max_prompt_chars=prompt_chars_limit(
            info.max_model_len, tokenizer.max_token_chars if tokenizer else 1
        ),
    )


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Restore SIGTERM's handler after the block: the process embedding the service (`tandem
    serve` drains on SIGTERM) owns its signals, not Ray's driver, which exits on SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def quiet_ray_startup() -> None:
    """Drop Ray's one expected start-up error: it reports that the dashboard failed to start
    even when the dashboard is turned off (include_dashboard=False)."""
    services = logging.getLogger("ray._private.services")
    if not any(isinstance(f, _DashboardNoise) for f in services.filters):
        services.addFilter(_DashboardNoise())


class _DashboardNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to start the dashboard")

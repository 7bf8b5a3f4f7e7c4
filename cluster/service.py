"""Assembling the service: a Ray cluster, a pool of worker actors, the gRPC router.

    Service(ServiceConfig(...)).start()   ray.init (local, or join --address), N EngineWorker
                                          actors, wait until each has loaded its model, then
                                          serve gRPC on host:port
    service.stop()                        stop accepting, finish or cancel streams, kill the
                                          actors, leave Ray (if this process started it)

Modes:
    colocated      `num_workers` EngineWorkers, each prefilling and decoding its own requests
                   (the baseline every disaggregation claim is measured against);
    disaggregated  `num_prefill_workers` PrefillWorkers and `num_decode_workers` EngineWorkers;
                   every prefill worker forms a KV-transfer pair with every decode worker.
Torch is imported by the workers, never here.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from cluster.prefix_index import IndexConfig, LocalPrefixIndex, PrefixLookup, make_prefix_index
from engine.config import EngineConfig
from engine.loader import describe_model, resolve_model
from router.admission import Admission, AdmissionLimits
from router.requests import ServedModel
from router.server import TandemServicer, set_serving, start_server

logger = logging.getLogger(__name__)

MODES = ("colocated", "disaggregated")


@dataclass(frozen=True)
class ServiceConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    num_workers: int = 1  # colocated mode
    mode: str = "colocated"
    num_prefill_workers: int = 1  # disaggregated mode
    num_decode_workers: int = 1
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (see Service.port)
    address: str | None = None  # a Ray cluster to join; None: start a local one
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    worker_start_timeout_s: float = 300.0
    health_interval_s: float = 1.0  # how often every worker is checked for life
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)  # work in flight
    # The global prefix-cache index (redis_url None: kept in the router, drained from workers
    # every index_drain_interval_s) and how much a cached prompt token weighs in placement.
    index: IndexConfig = field(default_factory=IndexConfig)
    cache_weight: float = 1.0
    index_drain_interval_s: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}")
        for name in ("num_workers", "num_prefill_workers", "num_decode_workers"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if not self.cache_weight >= 0:
            raise ValueError(f"cache_weight={self.cache_weight!r} must be >= 0")
        if not 0 < self.index_drain_interval_s <= 10:
            raise ValueError(
                f"index_drain_interval_s={self.index_drain_interval_s!r} must be in (0, 10]"
            )


class Service:
    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.workers: list[Any] = []  # decode (or colocated) workers
        self.prefill_workers: list[Any] = []
        self.port: int | None = None
        self._server: Any = None
        self._health: Any = None
        self._servicer: TandemServicer | None = None
        self._actor_class: Any = None
        self._prefill_class: Any = None
        self._watch_task: asyncio.Task[None] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self.prefix_index: PrefixLookup | None = None
        self._started_ray = False
        self.num_replaced = 0  # workers replaced after dying

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
        self._server, self.port, gate, self._health = await start_server(config.host, config.port)
        if not ray.is_initialized():
            ray.init(address=config.address, include_dashboard=False, log_to_driver=False)
            self._started_ray = True
        # Async actor: up to 1,000 concurrent method calls by default, one engine thread.
        cpus, gpus = config.cpus_per_worker, config.gpus_per_worker
        self._actor_class = ray.remote(num_cpus=cpus, num_gpus=gpus)(EngineWorker)
        disaggregated = config.mode == "disaggregated"
        num_decode = config.num_decode_workers if disaggregated else config.num_workers
        self.workers = [self._spawn("decode", i) for i in range(num_decode)]
        if disaggregated:
            from prefill_worker.actor import PrefillWorker

            self._prefill_class = ray.remote(num_cpus=cpus, num_gpus=gpus)(PrefillWorker)
            self.prefill_workers = [
                self._spawn("prefill", i) for i in range(config.num_prefill_workers)
            ]
        infos = await asyncio.wait_for(
            asyncio.gather(*(w.model_info.remote() for w in self.workers + self.prefill_workers)),
            config.worker_start_timeout_s,
        )
        if disaggregated:
            await self._form_pairs()
        model = served_model(config.engine.model, infos[0])
        prefilling_infos = infos[len(self.workers) :] if disaggregated else infos
        self.prefix_index = make_prefix_index(config.index)
        self._servicer = TandemServicer(
            model,
            list(self.workers),
            list(self.prefill_workers) if disaggregated else None,
            Admission(config.admission),
            self.prefix_index,
            [info["index_key"] for info in prefilling_infos],
            config.cache_weight,
        )
        gate.open(self._servicer)
        await set_serving(self._health, self._pools(), serving=True)
        self._watch_task = asyncio.create_task(self._watch())
        if isinstance(self.prefix_index, LocalPrefixIndex):
            self._drain_task = asyncio.create_task(self._drain_index(self.prefix_index))
        logger.info("serving %s on %s:%d with %d workers", model.model_id, config.host,
                    self.port, len(self.workers))  # fmt: skip

    async def stop(self, grace_s: float = 5.0) -> None:
        import ray

        for task in (self._watch_task, self._drain_task):
            if task is not None:
                task.cancel()
        self._watch_task = self._drain_task = None
        if self._server is not None:
            await set_serving(self._health, self._pools(), serving=False)
            await self._server.stop(grace_s)
            self._server = None
        workers = self.workers + self.prefill_workers
        if workers:  # a clean stop takes their entries out of the index; then they go
            await asyncio.wait([asyncio.ensure_future(w.shutdown.remote()) for w in workers],
                               timeout=grace_s)  # fmt: skip
        for worker in workers:
            ray.kill(worker)
        if self.prefix_index is not None:
            await self.prefix_index.close()
            self.prefix_index = None
        self.workers, self.prefill_workers = [], []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def _spawn(self, pool: str, index: int) -> Any:
        """A new worker actor for position `index` of `pool`; its index identity is the
        position (a replacement takes over the id, with a new epoch)."""
        config = self.config
        if pool == "prefill":
            return self._prefill_class.remote(config.engine, f"prefill-{index}", config.index)
        if config.mode == "colocated":  # colocated workers prefill: they publish their cache
            return self._actor_class.remote(config.engine, f"worker-{index}", config.index)
        return self._actor_class.remote(config.engine, f"decode-{index}", None)

    def _prefilling_workers(self) -> list[Any]:
        return self.prefill_workers if self.config.mode == "disaggregated" else self.workers

    async def _drain_index(self, index: LocalPrefixIndex) -> None:
        """Without Redis: pull the prefilling workers' cache changes into the router's index.
        A worker that does not answer is skipped (its entries expire if it stays silent)."""
        while True:
            await asyncio.sleep(self.config.index_drain_interval_s)
            assert self._servicer is not None
            keys = self._servicer.index_keys()
            calls = [
                asyncio.wait_for(
                    worker.drain_cache_events.remote(index.next_drain_seq(key.worker_id)), 5.0
                )
                for worker, key in zip(self._prefilling_workers(), keys, strict=True)
            ]
            for batch in await asyncio.gather(*calls, return_exceptions=True):
                if not isinstance(batch, BaseException):
                    index.apply(batch)

    def _pools(self) -> list[str]:
        return ["prefill", "decode"] if self.config.mode == "disaggregated" else ["decode"]

    async def _form_pairs(self) -> None:
        """A KV-transfer pair between every prefill and every decode worker."""
        addresses = await asyncio.gather(*(w.open_endpoint.remote() for w in self.workers))
        await asyncio.gather(
            *(
                self._connect(prefill, p, d, address)
                for p, prefill in enumerate(self.prefill_workers)
                for d, address in enumerate(addresses)
            )
        )

    async def _connect(self, prefill: Any, p: int, d: int, address: Any) -> None:
        """Pair prefill worker `prefill` (index p) with the decode worker d at `address`."""
        key = f"p{p}-d{d}-{uuid.uuid4().hex[:8]}"  # single-use: a fresh key per formation
        await prefill.connect.remote(d, address, key)

    async def _watch(self) -> None:
        """Check every worker each interval: feed its load to placement, and replace it if it
        died or its engine stopped, so each pool returns to size on its own. A slow answer is
        not death (a long prefill step delays it); only Ray's verdict, or the worker's own
        report of a failed engine, is."""
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            pools = [("decode", self.workers), ("prefill", self.prefill_workers)]
            checks = [(pool, i, w) for pool, workers in pools for i, w in enumerate(workers)]
            verdicts = await asyncio.gather(*(self._check(w) for _, _, w in checks))
            for (pool, index, worker), dead in zip(checks, verdicts, strict=True):
                if dead:
                    try:
                        await self._replace(pool, index, worker)
                    except Exception:  # try again at the next check
                        logger.exception("replacing %s worker %d failed", pool, index)

    async def _check(self, worker: Any) -> bool:
        """Whether `worker` must be replaced; on the way, its load goes to placement."""
        import ray

        try:
            stats = await asyncio.wait_for(worker.stats.remote(), self.config.health_interval_s * 5)
        except asyncio.TimeoutError:
            return False
        except ray.exceptions.RayActorError:
            return True
        if stats.get("failure"):
            logger.error("a worker's engine failed (%s): killing it", stats["failure"])
            ray.kill(worker, no_restart=True)
            return True
        if self._servicer is not None:
            self._servicer.observe(worker, stats)
        return False

    async def _replace(self, pool: str, index: int, dead: Any) -> None:
        """Start a replacement and, in disaggregated mode, re-form its KV pairs before it
        takes requests: a new decode worker pairs with every prefill worker, a new prefill
        worker with every decode worker."""
        logger.warning("%s worker %d died; starting a replacement", pool, index)
        assert self._servicer is not None
        new = self._spawn(pool, index)
        info = await asyncio.wait_for(new.model_info.remote(), self.config.worker_start_timeout_s)
        if pool == "decode":
            if self.prefill_workers:
                address = await new.open_endpoint.remote()
                await asyncio.gather(
                    *(
                        self._connect(prefill, p, index, address)
                        for p, prefill in enumerate(self.prefill_workers)
                    )
                )
            self.workers[index] = new  # ready, paired: now it may take requests
        else:
            addresses = await asyncio.gather(*(w.open_endpoint.remote() for w in self.workers))
            await asyncio.gather(
                *(self._connect(new, index, d, address) for d, address in enumerate(addresses))
            )
            self.prefill_workers[index] = new
        self._servicer.replace_worker(dead, new, info["index_key"])
        self.num_replaced += 1


def served_model(model_spec: str | None, info: dict[str, Any]) -> ServedModel:
    """The router's view of the workers' model: their limits, and a tokenizer of its own
    (read from the same model files, torch-free)."""
    description, _ = describe_model(resolve_model(model_spec))
    return ServedModel(
        model_id=info["model_id"],
        vocab_size=info["vocab_size"],
        max_model_len=info["max_model_len"],
        tokenizer=description.tokenizer,
        block_size=info["block_size"],
    )

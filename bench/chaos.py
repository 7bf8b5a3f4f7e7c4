"""Chaos run (issue 22.5): streaming requests while workers die and Redis restarts.

One local service on loopback (a fresh Ray cluster, the default model on CPU or, `--device
cuda`, one GPU per worker; the prefix index in a real redis-server), N streaming gRPC
requests (greedy and seeded, various lengths), run twice on the same arrival schedule:

1. the no-fault pass: nothing injected;
2. the chaos pass: at moments drawn from a seeded RNG, a worker of each pool is killed
   (`ray.kill`; a busy one when there is one) and redis-server is killed and started again on
   its port, empty.

The two passes use different cache salts, so the chaos pass finds no prefix the no-fault pass
cached. Afterwards every pool must be back to size and every surviving worker idle with all
its blocks free; then each worker's `check_integrity()` runs.

Reported (and the gates the test asserts):
- lost: requests of the chaos pass that did not finish OK (any gRPC error) -- must be 0;
- differing: finished requests whose tokens or text differ from the single engine's output for
  the same request (the no-fault reference, computed in this process) -- must be 0;
- leaked blocks: blocks still held by the surviving workers once they are idle, plus one per
  worker whose `check_integrity()` fails -- must be 0;
- added latency of a request: its end-to-end time (send to last message, at the client) in the
  chaos pass minus the same request's in the no-fault pass. "Migrated" requests are those whose
  router span says they resumed on another decode worker (`tandem.migrations` > 0, read from an
  in-memory span exporter of this process); the others are the control. With few migrated
  requests the p99 is their maximum: the count is printed beside it.

    python -m bench.chaos --mode disaggregated --num-requests 24 --duration-s 20 --seed 1 \
        --out bench/results/chaos.json
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import dummy_prompt_ids, machine_info, markdown_table, write_json

PROMPTS = (
    "Tell me a long story about a lighthouse keeper.",
    "The capital of France is",
    "List three colors and one fruit of each:",
    "Once upon a time",
    "Explain why the sky is blue, step by step.",
    "Write a short poem about the sea.",
    "Count from one to twenty in words:",
    "Summarize the plot of Hamlet for a child.",
)


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    """The size of a run. Fault moments are drawn uniformly in [kill_start_s, duration_s] after
    the chaos pass starts; requests arrive uniformly in [0, arrival_s] (keep the two windows
    overlapping: a fault after the last request ended tests nothing). A kill picks a live
    worker of its pool with requests in flight (an idle one if none is busy)."""

    mode: str = "disaggregated"
    num_requests: int = 12
    seed: int = 0
    duration_s: float = 12.0  # the window of injected faults
    arrival_s: float = 4.0
    kill_start_s: float = 0.5
    decode_kills: int = 1
    prefill_kills: int = 1  # disaggregated only (colocated: its workers are the decode pool)
    redis_restarts: int = 1
    redis_down_s: float = 1.0
    min_tokens: int = 8
    max_tokens: int = 32
    num_workers: int = 2  # colocated
    num_prefill_workers: int = 2
    num_decode_workers: int = 1
    num_kv_blocks: int = 512
    ray_cpus: int = 4
    settle_timeout_s: float = 180.0  # pools back to size, workers idle
    device: str = "cpu"  # "cuda": one GPU per worker, the references on a GPU too
    model: str = "default"  # or a dummy shape (dummy:smollm2-135m): token-id prompts

    def __post_init__(self) -> None:
        if self.mode not in ("colocated", "disaggregated"):
            raise ValueError(f"mode={self.mode!r} must be 'colocated' or 'disaggregated'")
        counts = ("num_requests", "decode_kills", "prefill_kills", "redis_restarts",
                  "min_tokens", "num_workers", "num_prefill_workers", "num_decode_workers",
                  "num_kv_blocks", "ray_cpus")  # fmt: skip
        for name in counts:
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"{name}={value!r} must be an int >= 0")
        if self.num_requests < 1 or self.min_tokens < 1:
            raise ValueError(f"num_requests={self.num_requests} and min_tokens="
                             f"{self.min_tokens} must be >= 1")  # fmt: skip
        if self.max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= min_tokens")
        for name in ("duration_s", "arrival_s", "kill_start_s", "redis_down_s", "settle_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ValueError(f"{name}={value!r} must be seconds >= 0")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be 'cpu' or 'cuda'")
        if self.kill_start_s > self.duration_s:
            raise ValueError(f"kill_start_s={self.kill_start_s} must be <= duration_s")


@dataclass(slots=True)
class Job:
    """One request of the workload and what each pass made of it."""

    index: int
    prompt: str | list[int]  # token ids for a dummy model (no tokenizer)
    max_tokens: int
    seed: int | None  # None: greedy
    arrival_s: float
    expected_tokens: list[int] = field(default_factory=list)
    expected_text: str = ""
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # pass -> result


@dataclass(slots=True)
class Fault:
    at_s: float
    kind: str  # "decode", "prefill", "redis"
    done_at_s: float | None = None
    detail: str = ""


def make_jobs(config: ChaosConfig) -> list[Job]:
    rng = random.Random(config.seed)
    jobs = []
    for i in range(config.num_requests):
        seeded = i % 2 == 1
        jobs.append(Job(
            index=i,
            prompt=(dummy_prompt_ids(i, 8 + i % 17) if config.model.startswith("dummy:")
                    else f"({i}) {PROMPTS[i % len(PROMPTS)]}"),
            max_tokens=rng.randint(config.min_tokens, config.max_tokens),
            seed=rng.randrange(1 << 30) if seeded else None,
            arrival_s=rng.uniform(0, config.arrival_s),
        ))  # fmt: skip
    return jobs


def make_faults(config: ChaosConfig) -> list[Fault]:
    rng = random.Random(config.seed + 1)
    kinds = ["decode"] * config.decode_kills + ["redis"] * config.redis_restarts
    if config.mode == "disaggregated":
        kinds += ["prefill"] * config.prefill_kills
    faults = [Fault(rng.uniform(config.kill_start_s, config.duration_s), kind) for kind in kinds]
    return sorted(faults, key=lambda f: f.at_s)


def sampling_params(job: Job) -> Any:
    from contracts.sampling_params import SamplingParams

    if job.seed is None:
        return SamplingParams(max_tokens=job.max_tokens, temperature=0.0, ignore_eos=True)
    return SamplingParams(max_tokens=job.max_tokens, temperature=0.9, seed=job.seed,
                          ignore_eos=True)  # fmt: skip


def grpc_request(job: Job, salt: str) -> Any:
    from proto.tandem.v1 import tandem_pb2 as pb

    if job.seed is None:
        sampling = pb.SamplingParameters(max_tokens=job.max_tokens, temperature=0.0,
                                         ignore_eos=True)  # fmt: skip
    else:
        sampling = pb.SamplingParameters(max_tokens=job.max_tokens, temperature=0.9,
                                         seed=job.seed, ignore_eos=True)  # fmt: skip
    prompt = ({"text": job.prompt} if isinstance(job.prompt, str)
              else {"token_ids": pb.TokenIds(ids=job.prompt)})  # fmt: skip
    return pb.GenerateRequest(**prompt, sampling=sampling, cache_salt=salt,
                              request_id=f"{salt}-{job.index}")  # fmt: skip


def compute_references(
    jobs: Sequence[Job], engine: Any = None, device: str = "cpu", model: str = "default"
) -> None:
    """The single engine's output for every job (`engine`, or a fresh one of `model` on
    `device`, as the workers run it): the no-fault reference."""
    from engine.config import EngineConfig
    from engine.engine import Engine

    if engine is None:
        engine = Engine(EngineConfig(model=model, device=device, num_kv_blocks=2048,
                                     block_size=16))  # fmt: skip
    for job in jobs:
        output = engine.generate([job.prompt], sampling_params(job))[0]
        job.expected_tokens, job.expected_text = list(output.token_ids), output.text


class ServiceUnderTest:
    """The asyncio service on a loop thread of its own, with its Ray cluster."""

    def __init__(self, config: Any, ray_cpus: int) -> None:
        import ray

        from cluster.service import Service, kv_secret_inherited

        with kv_secret_inherited(local=True):  # the workers' KV pairing secret, made up here
            ray.init(num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.service = Service(config)
        try:
            self.run(self.service.start(), timeout_s=600)
        except BaseException:
            self.close()
            raise

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout_s: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def pool_actors(self, pool: str) -> list[Any]:
        return self.service.workers if pool == "decode" else self.service.prefill_workers

    def all_actors(self) -> list[Any]:
        return self.service.workers + self.service.prefill_workers

    def close(self) -> None:
        import ray

        try:
            if self.service.port is not None:
                self.run(self.service.stop(), timeout_s=120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            ray.shutdown()


def one_request(stub: Any, job: Job, salt: str, start: float) -> dict[str, Any]:
    """Send `job` at its arrival moment; what came back, timed at the client."""
    import grpc

    time.sleep(max(0.0, start + job.arrival_s - time.monotonic()))
    sent = time.monotonic()
    tokens: list[int] = []
    text: list[str] = []
    first = None
    status = "OK"
    details = ""
    try:
        for response in stub.Generate(grpc_request(job, salt), timeout=600):
            if first is None and response.token_ids:
                first = time.monotonic()
            tokens += response.token_ids
            text.append(response.text)
    except grpc.RpcError as e:
        status, details = e.code().name, e.details() or ""
    ended = time.monotonic()
    return {
        "status": status, "details": details, "tokens": tokens, "text": "".join(text),
        "sent_s": sent - start, "ttft_s": None if first is None else first - sent,
        "e2e_s": ended - sent,
    }  # fmt: skip


def live_victim(actors: Sequence[Any], rng: random.Random) -> tuple[Any, int] | None:
    """A live worker with requests in flight, and their number (a live idle one when none
    is busy); None when none answers (all dead, replacements not in the pool yet)."""
    import ray

    busy: list[tuple[Any, int]] = []
    idle: list[tuple[Any, int]] = []
    for actor in actors:
        try:
            stats = ray.get(actor.stats.remote(), timeout=5)
        except Exception:  # dead or dying: not a candidate
            continue
        (busy if stats.num_requests else idle).append((actor, stats.num_requests))
    candidates = busy or idle
    return rng.choice(candidates) if candidates else None


def inject(sut: ServiceUnderTest, redis: Any, faults: Sequence[Fault], start: float,
           config: ChaosConfig, stop: threading.Event) -> None:  # fmt: skip
    """Run the faults at their moments (in this thread)."""
    import ray

    rng = random.Random(config.seed + 2)
    for fault in faults:
        if stop.wait(max(0.0, start + fault.at_s - time.monotonic())):
            return
        if fault.kind == "redis":
            redis.stop()
            stop.wait(config.redis_down_s)
            redis.start()
            fault.detail = f"down {config.redis_down_s:g} s"
        else:
            actors = sut.pool_actors(fault.kind)
            chosen = live_victim(actors, rng)
            if chosen is None:
                fault.detail = "no live worker (no kill)"
                continue
            victim, busy = chosen
            ray.kill(victim, no_restart=True)
            fault.detail = f"killed {fault.kind}[{actors.index(victim)}] ({busy} requests)"
        fault.done_at_s = time.monotonic() - start


def run_pass(sut: ServiceUnderTest, jobs: Sequence[Job], name: str, salt: str,
             faults: Sequence[Fault] = (), redis: Any = None,
             config: ChaosConfig | None = None) -> float:  # fmt: skip
    """All jobs at their arrival moments, faults injected meanwhile; the pass's wall time."""
    import grpc

    from proto.tandem.v1 import tandem_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{sut.service.port}")
    stub = tandem_pb2_grpc.TandemStub(channel)
    stop = threading.Event()
    start = time.monotonic()
    injector = None
    if faults:
        assert config is not None
        injector = threading.Thread(target=inject, args=(sut, redis, faults, start, config, stop),
                                    daemon=True)  # fmt: skip
        injector.start()
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda j: one_request(stub, j, salt, start), jobs))
    finally:
        if injector is not None:  # every fault still runs: their count is part of the report
            injector.join(600)
        stop.set()
        channel.close()
    for job, result in zip(jobs, results, strict=True):
        job.results[name] = result
    return time.monotonic() - start


def settle(sut: ServiceUnderTest, config: ChaosConfig) -> dict[str, Any]:
    """Wait until every pool is back to size with live workers (each answers `stats`), all
    idle with every block free, or the timeout; then count the blocks the live workers still
    hold and run each one's check_integrity() (a failure counts as a leaked block)."""
    import ray

    sizes = {"decode": config.num_workers if config.mode == "colocated"
             else config.num_decode_workers}  # fmt: skip
    if config.mode == "disaggregated":
        sizes["prefill"] = config.num_prefill_workers
    deadline = time.monotonic() + config.settle_timeout_s
    while True:
        sized = all(len(sut.pool_actors(pool)) == size for pool, size in sizes.items())
        live, dead, held = [], 0, 0
        for actor in sut.all_actors():
            try:
                stats = ray.get(actor.stats.remote(), timeout=30)
            except Exception:  # dead (not replaced yet) or still starting
                dead += 1
                continue
            live.append(actor)
            held += stats.num_blocks - stats.num_free_blocks + (1 if stats.num_requests else 0)
        if (sized and not dead and not held) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    integrity_errors = []
    for actor in live:
        try:
            ray.get(actor.check_integrity.remote(), timeout=60)
        except Exception as e:  # counted and reported
            integrity_errors.append(f"{type(e).__name__}: {e}")
    return {
        "pools_recovered": sized and not dead, "dead_workers": dead,
        "blocks_held": held, "integrity_errors": integrity_errors,
        "leaked_blocks": held + len(integrity_errors),
    }  # fmt: skip


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile, nearest rank (with few values, p99 is the maximum)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def migrations_by_request(spans: Sequence[Any]) -> dict[str, int]:
    counts = {}
    for span in spans:
        attributes = span.attributes or {}
        if span.name == "tandem.Generate" and "tandem.request_id" in attributes:
            counts[str(attributes["tandem.request_id"])] = int(
                attributes.get("tandem.migrations", 0)
            )
    return counts


def progress(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_chaos(config: ChaosConfig, engine: Any = None) -> dict[str, Any]:
    """One chaos run of `config`; the report (also the JSON written by the CLI). `engine`:
    the single engine of the references (None: one is loaded here)."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from cluster.service import ServiceConfig
    from engine.config import EngineConfig
    from prefix_cache.index import IndexConfig
    from telemetry.tracing import add_span_processor, remove_span_processor
    from tests.redis_server import RedisServer

    exporter = InMemorySpanExporter()
    spans = SimpleSpanProcessor(exporter)
    if not add_span_processor(spans, "chaos"):  # the router's spans land here
        raise RuntimeError("bench.chaos needs the process's spans (migrations are counted there)")

    jobs = make_jobs(config)
    faults = make_faults(config)
    started = time.monotonic()
    compute_references(jobs, engine, config.device, config.model)
    reference_s = time.monotonic() - started
    progress(f"single-engine references: {reference_s:.1f} s")

    with tempfile.TemporaryDirectory() as scratch:
        redis = RedisServer(Path(scratch))
        redis.start()
        service_config = ServiceConfig(
            engine=EngineConfig(
                model=config.model,
                device=config.device,
                num_kv_blocks=config.num_kv_blocks,
                block_size=16,
            ),
            gpus_per_worker=1.0 if config.device == "cuda" else 0.0,
            mode=config.mode,
            num_workers=config.num_workers,
            num_prefill_workers=config.num_prefill_workers,
            num_decode_workers=config.num_decode_workers,
            port=0,
            index=IndexConfig(
                redis_url=redis.url, lookup_budget_ms=200, retry_interval_s=0.2, ttl_s=5
            ),
        )
        sut = None
        try:
            started = time.monotonic()
            sut = ServiceUnderTest(service_config, config.ray_cpus)
            start_s = time.monotonic() - started
            progress(f"service started: {start_s:.1f} s")
            nofault_s = run_pass(sut, jobs, "nofault", "nofault")
            nofault_settle = settle(sut, config)
            progress(f"no-fault pass: {nofault_s:.1f} s")
            chaos_s = run_pass(sut, jobs, "chaos", "chaos", faults, redis, config)
            progress(f"chaos pass: {chaos_s:.1f} s")
            chaos_settle = settle(sut, config)
            progress(f"settled: {chaos_settle}")
            servicer = sut.service._servicer
            counters = {"migrated": servicer.num_migrated if servicer else None,
                        "retried": servicer.num_retried if servicer else None,
                        "replaced": sut.service.num_replaced}  # fmt: skip
        finally:
            if sut is not None:
                sut.close()
            redis.stop()

    migrations = migrations_by_request(exporter.get_finished_spans())
    remove_span_processor(spans)
    rows = []
    for job in jobs:
        chaos, nofault = job.results["chaos"], job.results["nofault"]
        rows.append({
            "index": job.index, "max_tokens": job.max_tokens,
            "sampling": "greedy" if job.seed is None else f"seed {job.seed}",
            "nofault_status": nofault["status"], "status": chaos["status"],
            "details": chaos["details"],
            "equal": chaos["tokens"] == job.expected_tokens and chaos["text"] == job.expected_text,
            "nofault_equal": nofault["tokens"] == job.expected_tokens
            and nofault["text"] == job.expected_text,
            "migrations": migrations.get(f"chaos-{job.index}", 0),
            "nofault_e2e_s": nofault["e2e_s"], "chaos_e2e_s": chaos["e2e_s"],
            "added_s": chaos["e2e_s"] - nofault["e2e_s"],
        })  # fmt: skip
    finished = [r for r in rows if r["status"] == "OK"]
    migrated = [r["added_s"] for r in finished if r["migrations"]]
    control = [r["added_s"] for r in finished if not r["migrations"]]
    summary = {
        "requests": len(rows),
        "lost": sum(r["status"] != "OK" for r in rows),
        "differing": sum(not r["equal"] for r in finished),
        "leaked_blocks": chaos_settle["leaked_blocks"],
        "pools_recovered": chaos_settle["pools_recovered"],
        "nofault_lost": sum(r["nofault_status"] != "OK" for r in rows),
        "nofault_differing": sum(not r["nofault_equal"] for r in rows),
        "migrated_requests": len(migrated),
        "added_p50_migrated_s": percentile(migrated, 50),
        "added_p99_migrated_s": percentile(migrated, 99),
        "added_p50_others_s": percentile(control, 50),
        "added_p99_others_s": percentile(control, 99),
        "faults_injected": sum(f.done_at_s is not None for f in faults),
        "faults_planned": len(faults),
    }
    return {
        "config": asdict(config), "summary": summary, "counters": counters,
        "faults": [asdict(f) for f in faults], "requests": rows,
        "settle": {"nofault": nofault_settle, "chaos": chaos_settle},
        "seconds": {"reference": reference_s, "service_start": start_s,
                    "nofault_pass": nofault_s, "chaos_pass": chaos_s},
    }  # fmt: skip


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report_table(report: dict[str, Any]) -> str:
    s = report["summary"]
    rows = [
        ("requests", str(s["requests"])),
        ("faults injected / planned", f"{s['faults_injected']} / {s['faults_planned']}"),
        ("lost (must be 0)", str(s["lost"])),
        ("outputs differing from the no-fault run (must be 0)", str(s["differing"])),
        ("KV blocks leaked (must be 0)", str(s["leaked_blocks"])),
        ("pools back to size, every worker live", str(s["pools_recovered"])),
        ("migrated requests", str(s["migrated_requests"])),
        ("added latency, migrated: p50 / p99 (s)",
         f"{fmt_s(s['added_p50_migrated_s'])} / {fmt_s(s['added_p99_migrated_s'])}"),
        ("added latency, not migrated: p50 / p99 (s)",
         f"{fmt_s(s['added_p50_others_s'])} / {fmt_s(s['added_p99_others_s'])}"),
    ]  # fmt: skip
    faults = [(fmt_s(f["at_s"]), f["kind"], f["detail"]) for f in report["faults"]]
    return (markdown_table(("", "chaos run"), rows) + "\n\n"
            + markdown_table(("at (s)", "fault", "what"), faults))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = ChaosConfig()
    parser.add_argument("--mode", default=defaults.mode, choices=("colocated", "disaggregated"))
    for name in ("num_requests", "seed", "decode_kills", "prefill_kills", "redis_restarts",
                 "min_tokens", "max_tokens", "num_workers", "num_prefill_workers",
                 "num_decode_workers", "num_kv_blocks", "ray_cpus"):  # fmt: skip
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=getattr(defaults, name))
    for name in ("duration_s", "arrival_s", "kill_start_s", "redis_down_s", "settle_timeout_s"):
        parser.add_argument("--" + name.replace("_", "-"), type=float,
                            default=getattr(defaults, name))  # fmt: skip
    parser.add_argument("--model", default=defaults.model,
                        help="the default model, or a dummy shape (token-id prompts)")  # fmt: skip
    parser.add_argument("--device", default=defaults.device, choices=("cpu", "cuda"),
                        help="cuda: a GPU per worker, the references on one too")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results/chaos.json"))
    args = parser.parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k != "out"}
    try:
        config = ChaosConfig(**fields)
    except ValueError as e:
        parser.error(str(e))
    report = run_chaos(config)
    report["machine"] = machine_info()
    print(report_table(report))
    print(f"\nwrote {write_json(args.out, report)}")
    s = report["summary"]
    clean = s["lost"] == s["differing"] == s["leaked_blocks"] == 0 and s["pools_recovered"]
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())

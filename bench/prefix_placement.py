"""Cache-aware vs load-only placement on a shared-prefix workload, through the whole service.

`--groups` groups, each with a system prompt of about `--system-tokens` tokens, and
`--questions` short questions per group, arrive in a seeded random order as a Poisson stream at
`--rate` requests/s. The service runs disaggregated (`--prefill-workers` 2, one decode worker,
the default model on CPU unless `--device cuda`), once per policy, same requests, same order:

    cache-aware   the prefix index (in the router, or Redis with --redis-url) and
                  cache_weight 1: a request goes where its prefix is, unless that queue is longer
    load-only     cache_weight 0: the least queued prompt tokens, prefixes ignored

Before the timed run each group's system prompt is sent once (both policies alike), so the
table shows the steady state of warm caches rather than the cold start. Reported per policy:
the share of prompt tokens served from the prefix cache (the workers'
own count, `usage.cached_tokens`), the share of requests that hit, and the time to first token
measured by the client (p50, p99, mean).

    python -m bench.prefix_placement [--groups 8 --questions 6 --rate 1.0 --out f.json]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

from bench.common import machine_info, markdown_table, write_json

POLICIES = {"cache-aware": 1.0, "load-only": 0.0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--questions", type=int, default=6, help="per group")
    parser.add_argument("--system-tokens", type=int, default=1000, help="about, per group")
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--prefill-workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-warmup", action="store_true", help="start with cold caches")
    parser.add_argument("--out", default="bench/results/prefix_placement.json")
    return parser.parse_args()


def workload(groups: int, questions: int, system_tokens: int, seed: int) -> list[str]:
    """The prompts, in arrival order: each group's system prompt (~6 tokens a rule) and a
    question; groups interleaved at random."""
    rules_per_group = max(1, system_tokens // 6)
    prompts = []
    for g in range(groups):
        system = f"You are assistant number {g}. " + " ".join(
            f"Rule {n}: be kind {g}." for n in range(rules_per_group)
        )
        prompts += [f"{system}\nQuestion {q}: what is {q} + {g}?" for q in range(questions)]
    random.Random(seed).shuffle(prompts)
    return prompts


async def run_policy(args: argparse.Namespace, cache_weight: float, prompts: list[str]) -> Any:
    import grpc

    from cluster.service import Service, ServiceConfig
    from engine.config import EngineConfig
    from prefix_cache.index import IndexConfig
    from proto.tandem.v1 import tandem_pb2 as pb
    from proto.tandem.v1 import tandem_pb2_grpc

    config = ServiceConfig(
        engine=EngineConfig(model=args.model, device=args.device, num_kv_blocks=1024),
        mode="disaggregated",
        num_prefill_workers=args.prefill_workers,
        num_decode_workers=1,
        port=0,
        gpus_per_worker=1.0 if args.device == "cuda" else 0.0,
        index=IndexConfig(redis_url=args.redis_url, lookup_budget_ms=20),
        cache_weight=cache_weight,
    )
    service = Service(config)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = tandem_pb2_grpc.TandemStub(channel)
            sampling = pb.SamplingParameters(
                max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True
            )

            async def one(prompt: str, delay: float) -> dict[str, Any]:
                await asyncio.sleep(delay)
                sent = time.perf_counter()
                ttft = None
                last = None
                async for response in stub.Generate(
                    pb.GenerateRequest(text=prompt, sampling=sampling), timeout=600
                ):
                    if ttft is None:
                        ttft = time.perf_counter() - sent
                    last = response
                assert last is not None and ttft is not None
                return {
                    "ttft_s": ttft,
                    "prompt_tokens": last.usage.prompt_tokens,
                    "cached_tokens": last.usage.cached_tokens,
                }

            if not args.no_warmup:  # one request per group, one at a time: caches warm
                for prefix in sorted({p.split("\nQuestion")[0] for p in prompts}):
                    await one(prefix + "\nQuestion: hello?", 0.0)
            rng = random.Random(args.seed + 1)
            delays, at = [], 0.0
            for _ in prompts:
                delays.append(at)
                at += rng.expovariate(args.rate)
            started = time.perf_counter()
            calls = [one(p, d) for p, d in zip(prompts, delays, strict=True)]
            results = await asyncio.gather(*calls)
            elapsed = time.perf_counter() - started
        index = service.prefix_index
        degraded = index.metrics.num_degraded if index is not None else 0
    finally:
        await service.stop()
    return results, elapsed, degraded


def summarize(results: list[dict[str, Any]], elapsed: float, degraded: int) -> dict[str, Any]:
    ttfts = sorted(r["ttft_s"] for r in results)
    prompt = sum(r["prompt_tokens"] for r in results)
    cached = sum(r["cached_tokens"] for r in results)
    return {
        "requests": len(results),
        "token_hit_rate": cached / prompt,
        "request_hit_rate": sum(r["cached_tokens"] > 0 for r in results) / len(results),
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
        "ttft_mean_s": statistics.fmean(ttfts),
        "elapsed_s": elapsed,
        "degraded_lookups": degraded,
    }


def main() -> None:
    import ray

    args = parse_args()
    prompts = workload(args.groups, args.questions, args.system_tokens, args.seed)
    summaries = {}
    try:
        for name, weight in POLICIES.items():
            print(f"running {name} ({len(prompts)} requests at {args.rate}/s) ...", flush=True)
            results, elapsed, degraded = asyncio.run(run_policy(args, weight, prompts))
            summaries[name] = summarize(results, elapsed, degraded)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    rows = [
        [
            name,
            f"{s['token_hit_rate']:.0%}",
            f"{s['request_hit_rate']:.0%}",
            f"{s['ttft_p50_s'] * 1e3:.0f} ms",
            f"{s['ttft_p99_s'] * 1e3:.0f} ms",
            f"{s['ttft_mean_s'] * 1e3:.0f} ms",
        ]
        for name, s in summaries.items()
    ]
    headers = ["placement", "prompt tokens cached", "requests hit", "TTFT p50", "TTFT p99",
               "TTFT mean"]  # fmt: skip
    print(markdown_table(headers, rows))
    path = write_json(
        args.out,
        {"config": vars(args), "machine": machine_info(("torch", "ray")), "results": summaries},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Drain of a decode worker with running streams (issue 22.3): how long the drain takes and how
many tokens are lost, moving each stream's KV to another decode worker over the KV-transfer
layer (`--drain-move-kv`: `FailoverConfig(move_kv_on_drain=True)`) and by replay (each stream
cut at a token boundary and recomputed on another decode worker), beside the baseline in the
same run, a drain that waits for the streams to finish (`FailoverConfig(migrate_on_drain=
False)`, the behaviour before).

    python -m bench.drain [--mode colocated|disaggregated] [--streams 32] [--max-tokens 128]
                          [--cases none,kv,replay,wait] [--output drain.json]

A local Ray cluster and the service with two decode workers (colocated: two workers;
disaggregated: one prefill worker and two decode workers), the default model on the CPU (or
`--device cuda`: one GPU per worker), the gRPC router on loopback. Each case: `--streams`
streaming requests (half greedy, half seeded) all started on one decode worker; once each has
received `--cut-after` tokens the worker is drained (`Service.drain_worker`); every stream's
tokens are compared with the same request's in a run without the drain (the first case, "none").
Reported per case: drain time (drain asked to the worker gone: KV pairs formed, streams moved,
moved KV landed, or streams cut; each phase too), time until every stream ended, tokens lost
(fewer than the no-fault run), streams differing from the no-fault run, streams moved by KV and
by replay; from the drain on, prompt tokens the staying workers and the prefill pool computed
(the engines' counter: the prompt part only; a replay also recomputes the output tokens a stream
had, `tokens_at_drain` in all) and KV tokens the staying decode workers received (moved by a
drain, or shipped by the prefill pool for a replay).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from bench.common import dummy_prompt_ids, machine_info


def _sampling(index: int, max_tokens: int) -> Any:
    from proto.tandem.v1 import tandem_pb2 as pb

    if index % 2 == 0:
        return pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return pb.SamplingParameters(max_tokens=max_tokens, temperature=1.0, seed=index,
                                 ignore_eos=True)  # fmt: skip


def _prompt(index: int, model: str) -> dict[str, Any]:
    """Stream `index`'s prompt as GenerateRequest fields: text, or token ids for a dummy model
    (it has no tokenizer)."""
    from proto.tandem.v1 import tandem_pb2 as pb

    if model.startswith("dummy:"):
        return {"token_ids": pb.TokenIds(ids=dummy_prompt_ids(index))}
    return {"text": f"Story number {index}: once upon a time"}


async def _stream(stub: Any, index: int, args: argparse.Namespace, got: list[list[int]]) -> None:
    from proto.tandem.v1 import tandem_pb2 as pb

    request = pb.GenerateRequest(**_prompt(index, args.model),
                                 sampling=_sampling(index, args.max_tokens))  # fmt: skip
    async for response in stub.Generate(request, timeout=600):
        got[index].extend(response.token_ids)


async def run_case(service: Any, stub: Any, args: argparse.Namespace, drain: str) -> dict[str, Any]:
    """One case: `drain` is "none" (the no-fault run), "kv", "replay" or "wait"."""
    from cluster.workers import actor_of
    from router.failover import FailoverConfig

    servicer = service._servicer
    pool = service.pools["decode"]
    while len(pool.members()) < 2:  # the last case retired one
        client, info = await service.start_worker("decode")
        pool.add(client, info.index_key)
    leaving, staying = pool.members()[:2]
    servicer.failover = FailoverConfig(migrate_on_drain=drain != "wait",
                                       move_kv_on_drain=drain == "kv")  # fmt: skip
    migrated, moves = servicer.num_migrated, dict(servicer.num_drain_moves)
    got: list[list[int]] = [[] for _ in range(args.streams)]
    staying.load.draining = True  # every stream starts on the worker that will leave
    started = time.monotonic()
    tasks = [asyncio.ensure_future(_stream(stub, i, args, got))
             for i in range(args.streams)]  # fmt: skip
    while min(len(tokens) for tokens in got) < args.cut_after:
        if any(task.done() for task in tasks):
            await asyncio.gather(*tasks)  # raises what ended one early
        await asyncio.sleep(0.01)
    staying.load.draining = False
    result: dict[str, Any] = {"drain": drain}
    if drain != "none":
        others = [actor_of(m) for m in pool.members() if m is not leaving]
        others += service.prefill_workers
        computed, received = await _stats_sums(others)
        cut = time.monotonic()
        result["tokens_at_drain"] = sum(len(tokens) for tokens in got)
        report = await service.drain_worker("decode", leaving, timeout_s=600)
        result["drain_s"] = time.monotonic() - cut
        result |= {"left_empty": report.left_empty, "pairing_s": report.pairing_s,
                   "moving_s": report.moving_s, "landing_s": report.landing_s}  # fmt: skip
        await asyncio.gather(*tasks)
        result["streams_done_after_drain_s"] = time.monotonic() - cut
        computed_after, received_after = await _stats_sums(others)
        result["prompt_tokens_computed"] = computed_after - computed
        result["kv_tokens_received"] = received_after - received
    else:
        await asyncio.gather(*tasks)
    result["all_streams_s"] = time.monotonic() - started
    result["migrations"] = servicer.num_migrated - migrated
    result["moved_kv"] = servicer.num_drain_moves["kv"] - moves["kv"]
    result["replayed"] = servicer.num_drain_moves["replay"] - moves["replay"]
    result["tokens"] = got
    return result


async def _stats_sums(actors: list[Any]) -> tuple[int, int]:
    """Prompt tokens these workers' engines have run, and KV tokens they received, ever."""
    stats = await asyncio.gather(*(actor.stats.remote() for actor in actors))
    return (sum(s.num_prompt_tokens_computed for s in stats),
            sum(s.kv.tokens_received for s in stats))  # fmt: skip


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from cluster.service import Service, ServiceConfig
    from engine.config import EngineConfig
    from proto.tandem.v1 import tandem_pb2_grpc

    config = ServiceConfig(
        engine=EngineConfig(model=args.model, device=args.device, num_kv_blocks=4096,
                            block_size=16),
        mode=args.mode, num_workers=2, num_prefill_workers=1, num_decode_workers=2, port=0,
        gpus_per_worker=1.0 if args.device == "cuda" else 0.0,
    )  # fmt: skip
    service = Service(config)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = tandem_pb2_grpc.TandemStub(channel)
            cases = [await run_case(service, stub, args, drain)
                     for drain in ("none", *args.cases)]  # fmt: skip
    finally:
        await service.stop()
    reference = cases[0]["tokens"]
    for case in cases:
        tokens = case.pop("tokens")
        case["tokens_lost"] = sum(
            max(0, len(r) - len(t)) for r, t in zip(reference, tokens, strict=True)
        )
        case["tokens_extra"] = sum(
            max(0, len(t) - len(r)) for r, t in zip(reference, tokens, strict=True)
        )
        case["streams_differing"] = sum(r != t for r, t in zip(reference, tokens, strict=True))
    return {"machine": machine_info(), "args": vars(args) | {"output": str(args.output)},
            "cases": cases}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("colocated", "disaggregated"), default="colocated")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--cut-after", type=int, default=8, help="tokens each stream has first")
    parser.add_argument(
        "--cases",
        default="kv,replay,wait",
        help="drains to run after the reference, in order: kv, replay, wait",
    )
    parser.add_argument(
        "--model",
        default="default",
        help="the default model, or a dummy shape (dummy:smollm2-135m: token-id prompts)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: one GPU per worker (colocated: 2 GPUs; disaggregated: 3)",
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON results")
    args = parser.parse_args()
    args.cases = args.cases.split(",")
    if not args.cases or set(args.cases) - {"kv", "replay", "wait"}:
        parser.error(f"--cases={','.join(args.cases)}: each must be kv, replay or wait")
    import ray

    # disaggregated: the local workers pair over loopback with a secret of this run's
    os.environ.setdefault("TANDEM_KV_SECRET", secrets.token_hex(16))

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        results = asyncio.run(main_async(args))
    finally:
        ray.shutdown()
    for case in results["cases"]:
        print(json.dumps(case))
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

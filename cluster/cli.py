"""The `tandem` command line.

    tandem generate "prompt" [--chat] [--model PATH] [--max-tokens N] [--temperature T]
                             [--top-p P] [--top-k K] [--seed S] [--json]
    tandem serve [--model PATH] [--mode disaggregated|colocated] [--prefill-workers N]
                 [--decode-workers M] [--workers N] [--host H] [--port P] [--address RAY]
                 [--redis-url URL] [--metrics-port P] [--otlp-endpoint H:P] [--autoscale ...]
    tandem client "prompt" [--target HOST:PORT] [--chat] [--max-tokens N] [--temperature T]
    tandem demo [PROMPT ...] [--mode ...] [--max-tokens N]      (serve, ask, print, stop)
    tandem bench [--target HOST:PORT] [--workload W] [--rates 1,2,4] [--slo ...] | compare A B

Torch is imported only by the commands that run an engine, so `tandem --help` is instant.
Exit codes: 0 done, 2 bad input or model, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from engine.errors import InvalidRequest, TandemError

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate text with a local engine")
    generate.add_argument("prompt", help="the prompt text (a user message with --chat)")
    generate.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt as a user message in the model's chat template",
    )
    generate.add_argument(
        "--model",
        default=None,
        help="GGUF file, Hugging Face directory or dummy:<shape>; "
        "default: the bundled SmolLM2-135M-Instruct",
    )
    generate.add_argument("--max-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0, help="0 means off")
    generate.add_argument("--min-p", type=float, default=0.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=[], help="a stop string (repeat)")
    generate.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    generate.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16")
    )
    generate.add_argument(
        "--json", action="store_true", help="print one JSON object with token ids, text and usage"
    )
    generate.set_defaults(handler=run_generate)

    serve = commands.add_parser("serve", help="serve the gRPC API from a pool of Ray workers")
    serve.add_argument("--model", default=None, help="as for generate")
    add_pool_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051, help="0: any free port")
    serve.add_argument("--address", default=None, help="a Ray cluster to join (default: local)")
    serve.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    serve.set_defaults(handler=run_serve)

    client = commands.add_parser("client", help="stream one answer from a running service")
    client.add_argument("prompt")
    client.add_argument("--target", default="127.0.0.1:50051")
    client.add_argument("--chat", action="store_true", help="send the prompt as a user message")
    client.add_argument("--max-tokens", type=int, default=256)
    client.add_argument("--temperature", type=float, default=0.0)
    client.add_argument("--timeout", type=float, default=300.0, help="seconds")
    client.set_defaults(handler=run_client)

    demo = commands.add_parser(
        "demo", help="start the service locally, stream a few concurrent answers, stop"
    )
    demo.add_argument("prompts", nargs="*", default=list(DEMO_PROMPTS))
    demo.add_argument("--model", default=None)
    add_pool_arguments(demo)
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    demo.set_defaults(handler=run_demo)

    from bench.serving.cli import add_arguments as add_bench_arguments  # argparse only: cheap

    add_bench_arguments(commands.add_parser("bench", help="measure a running service under load"))
    return parser


DEMO_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
    "What is 12 times 12?",
)


def run_demo(args: argparse.Namespace) -> int:
    """The README's main command: the whole path (Ray workers, gRPC router, streaming
    clients) on this machine, with each answer's time to first token and decode rate."""
    import asyncio

    import grpc

    from cluster.service import Service
    from proto.tandem.v1 import tandem_pb2 as pb
    from proto.tandem.v1 import tandem_pb2_grpc

    config = pool_config(args, 0)

    async def ask(stub: object, prompt: str) -> tuple[str, float, float, int]:
        request = pb.GenerateRequest(sampling=pb.SamplingParameters(max_tokens=args.max_tokens))
        request.chat.messages.add(role="user", content=prompt)
        started = time.monotonic()
        first = None
        text, tokens = [], 0
        async for response in stub.Generate(request, timeout=600):  # type: ignore[attr-defined]
            if first is None:
                first = time.monotonic() - started
            text.append(response.text)
            tokens += len(response.token_ids)
        total = time.monotonic() - started
        return "".join(text), first or total, total, tokens

    async def demo() -> None:
        service = Service(config)
        pools = (
            f"{args.prefill_workers} prefill + {args.decode_workers} decode workers"
            if args.mode == "disaggregated"
            else f"{args.workers} colocated workers"
        )
        print(f"tandem: starting {pools} (local Ray) ...", flush=True)
        await service.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                stub = tandem_pb2_grpc.TandemStub(channel)
                print(f"tandem: serving on port {service.port}; {len(args.prompts)} concurrent "
                      "requests\n", flush=True)  # fmt: skip
                results = await asyncio.gather(*(ask(stub, p) for p in args.prompts))
            for prompt, (text, ttft, total, tokens) in zip(args.prompts, results, strict=True):
                rate = (tokens - 1) / (total - ttft) if tokens > 1 and total > ttft else 0.0
                print(f"> {prompt}\n{text.strip()}\n[TTFT {1000 * ttft:.0f} ms, {tokens} "
                      f"tokens, {rate:.1f} tokens/s]\n")  # fmt: skip
        finally:
            await service.stop()
        print("tandem: stopped", flush=True)

    asyncio.run(demo())
    return 0


def add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        default="disaggregated",
        choices=("disaggregated", "colocated"),
        help="disaggregated: separate prefill and decode pools, KV moved between them; "
        "colocated: every worker does both (the baseline)",
    )
    parser.add_argument("--prefill-workers", type=int, default=1, help="disaggregated mode")
    parser.add_argument("--decode-workers", type=int, default=1, help="disaggregated mode")
    parser.add_argument("--workers", type=int, default=2, help="colocated mode")
    parser.add_argument(
        "--redis-url",
        default=None,
        help="the global prefix-cache index in Redis (redis://host:port/db, rediss:// for TLS), "
        "shared by every router; its password from $TANDEM_REDIS_PASSWORD. Default: an "
        "index kept in this router's process",
    )
    parser.add_argument("--redis-tls-ca-file", default=None, help="CA bundle for rediss://")
    parser.add_argument(
        "--cache-weight",
        type=float,
        default=1.0,
        help="how much a cached prompt token counts against a queued one in placement "
        "(0: place by load alone)",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port"
    )
    for pool in ("prefill", "decode"):
        parser.add_argument(
            f"--{pool}-resources",
            type=_resources,
            default={},
            help=f"custom Ray resources each {pool} worker asks for, as JSON "
            f"(e.g. '{{\"tandem_{pool}\": 1}}'): keeps the pool on the nodes that offer them",
        )
    parser.add_argument(
        "--kv-interface",
        default=None,
        help="network interface whose address KV pairs use (hosts with several NICs; also "
        "$TANDEM_KV_INTERFACE). Default: the node's address in the Ray cluster",
    )
    parser.add_argument(
        "--kv-ports",
        default=None,
        help="port range of KV endpoints, MIN-MAX (also $TANDEM_KV_PORTS). Default: any free",
    )
    parser.add_argument(
        "--otlp-endpoint",
        default=None,
        help="send OpenTelemetry traces to this OTLP/gRPC collector (host:port)",
    )
    scaling = parser.add_argument_group("autoscaling (each pool between its min and max)")
    scaling.add_argument("--autoscale", action="store_true", help="grow and shrink the pools")
    for pool in ("prefill", "decode"):
        scaling.add_argument(f"--{pool}-min-workers", type=int, default=None)
        scaling.add_argument(f"--{pool}-max-workers", type=int, default=None)
    scaling.add_argument(
        "--target-queued-tokens",
        type=float,
        default=None,
        help="prefill: queued prompt tokens per worker (default 8192)",
    )
    scaling.add_argument("--target-ttft-ms", type=float, default=None, help="prefill: TTFT p90")
    scaling.add_argument(
        "--target-kv-usage",
        type=float,
        default=None,
        help="decode: KV-cache use, 0-1 (default 0.8)",
    )
    scaling.add_argument("--target-itl-ms", type=float, default=None,
                         help="decode: inter-token latency p90")  # fmt: skip


def _resources(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('a JSON object of resource amounts, e.g. {"gpu_a": 1}')
    return value


def autoscaling_config(args: argparse.Namespace) -> Any:
    """The pools' scaling policies from the command line; sizes default to the pool's."""
    from cluster.autoscaler import AutoscalingConfig, ScalingPolicy, default_targets

    if not args.autoscale:
        return AutoscalingConfig()
    colocated = args.mode == "colocated"
    sizes = {"prefill": args.prefill_workers,
             "decode": args.workers if colocated else args.decode_workers}  # fmt: skip
    given = {
        "queued_tokens": args.target_queued_tokens,
        "ttft": None if args.target_ttft_ms is None else args.target_ttft_ms / 1000,
        "kv_usage": args.target_kv_usage,
        "itl": None if args.target_itl_ms is None else args.target_itl_ms / 1000,
    }
    policies = {}
    for pool, size in sizes.items():
        kind = "colocated" if colocated and pool == "decode" else pool
        targets = default_targets(kind)
        targets.update({k: v for k, v in given.items() if v is not None and
                        (kind == "colocated" or k in _POOL_SIGNALS[pool])})  # fmt: skip
        low = getattr(args, f"{pool}_min_workers")
        high = getattr(args, f"{pool}_max_workers")
        try:
            policies[pool] = ScalingPolicy(
                min_workers=size if low is None else low,
                max_workers=max(size if high is None else high, size if low is None else low),
                targets=targets,
            )
        except ValueError as e:
            raise ValueError(f"{pool} pool autoscaling: {e}") from None
    return AutoscalingConfig(enabled=True, prefill=policies["prefill"], decode=policies["decode"])


_POOL_SIGNALS = {"prefill": ("queued_tokens", "ttft"), "decode": ("kv_usage", "itl")}


def pool_config(args: argparse.Namespace, port: int) -> Any:
    import os

    from cluster.prefix_index import IndexConfig
    from cluster.service import ServiceConfig
    from cluster.tracing import TracingConfig
    from engine.config import EngineConfig
    from kvtransfer.network import KVNetworkConfig

    index = IndexConfig(
        redis_url=args.redis_url,
        redis_password=os.environ.get("TANDEM_REDIS_PASSWORD") or None,
        redis_tls_ca_file=args.redis_tls_ca_file,
    )
    return ServiceConfig(
        index=index,
        cache_weight=args.cache_weight,
        metrics_port=args.metrics_port,
        tracing=TracingConfig(otlp_endpoint=args.otlp_endpoint),
        kv_network=KVNetworkConfig.from_environment(args.kv_interface, args.kv_ports),
        autoscaling=autoscaling_config(args),
        prefill_resources=args.prefill_resources,
        decode_resources=args.decode_resources,
        engine=EngineConfig(model=args.model, device=args.device),
        mode=args.mode,
        num_workers=args.workers,
        num_prefill_workers=args.prefill_workers,
        num_decode_workers=args.decode_workers,
        host=getattr(args, "host", "127.0.0.1"),
        port=port,
        address=getattr(args, "address", None),
        gpus_per_worker=1.0 if args.device == "cuda" else 0.0,
    )


def run_serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from cluster.service import Service

    config = pool_config(args, args.port)

    async def serve() -> None:
        service = Service(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await service.start()
        print(f"tandem: serving on {config.host}:{service.port}", flush=True)
        try:
            await stop.wait()
        finally:
            await service.stop()
        print("tandem: stopped", flush=True)

    asyncio.run(serve())
    return 0


def run_client(args: argparse.Namespace) -> int:
    import grpc

    from proto.tandem.v1 import tandem_pb2 as pb
    from proto.tandem.v1 import tandem_pb2_grpc

    request = pb.GenerateRequest(
        sampling=pb.SamplingParameters(max_tokens=args.max_tokens, temperature=args.temperature)
    )
    if args.chat:
        request.chat.messages.add(role="user", content=args.prompt)
    else:
        request.text = args.prompt
    started = time.monotonic()
    with grpc.insecure_channel(args.target) as channel:
        stub = tandem_pb2_grpc.TandemStub(channel)
        try:
            last = None
            for response in stub.Generate(request, timeout=args.timeout):
                sys.stdout.write(response.text)
                sys.stdout.flush()
                last = response
        except grpc.RpcError as e:
            print(f"\ntandem: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
    elapsed = time.monotonic() - started
    if last is not None:
        tokens = last.usage.completion_tokens
        print(f"\n[{tokens} tokens in {elapsed:.2f} s; {last.usage.prompt_tokens} prompt tokens]")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    if not args.prompt:
        raise InvalidRequest("prompt", "prompt is empty")
    messages = [{"role": "user", "content": args.prompt}] if args.chat else None
    engine = Engine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype))
    token_ids: list[int] = []
    text: list[str] = []
    last = None
    prompt = None if args.chat else args.prompt
    for output in engine.stream("cli", prompt, params, messages=messages):
        token_ids += output.new_token_ids
        text.append(output.text_delta)
        if not args.json:
            sys.stdout.write(output.text_delta)
            sys.stdout.flush()
        last = output
    assert last is not None and last.finish_reason is not None
    if args.json:
        result = {
            "model": engine.model_id,
            "token_ids": token_ids,
            "text": "".join(text),
            "finish_reason": last.finish_reason.value,
            "usage": {
                "prompt_tokens": last.usage.prompt_tokens,
                "cached_tokens": last.usage.cached_tokens,
                "completion_tokens": last.usage.completion_tokens,
            },
        }
        print(json.dumps(result))
    else:
        sys.stdout.write("\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args))
    except TandemError as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # configuration values, raised by the config dataclasses
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

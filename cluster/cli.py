"""The `tandem` command line: generate, serve, client, demo, bench, profile, plan.

Synopsis and exit codes: docs/operations.md, "The tandem command".

A prompt is sent as a user message in the model's chat template when the model has one (what
an instruct model expects); `--raw` sends the text as is. Torch is imported only by the
commands that run an engine, so `tandem --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.serving.cli import add_arguments as add_bench_arguments  # argparse only: cheap
from bench.serving.cli import add_connection_arguments
from cluster.node_cli import add_drain_node_arguments, add_node_arguments, run_drain_node, run_node
from contracts.errors import InvalidRequest, TandemError

logger = logging.getLogger(__name__)


DEVICES = ("auto", "cpu", "cuda")
DEVICE_HELP = "where the engines run; auto: cuda if a GPU is there, else cpu"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one worth saying (not None, off or empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Help that shows each option's default; subcommands are parsers of this class too, and
    `commands` names them (their errors come with their own usage)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}


def build_parser() -> _Parser:
    parser = _Parser(prog="tandem", description=__doc__.splitlines()[0])
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at INFO level, Ray and gRPC included"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate = commands.add_parser("generate", help="generate text with a local engine")
    generate.add_argument("prompt", help="the prompt text")
    add_prompt_form_arguments(generate)
    generate.add_argument(
        "--model",
        default=None,
        help="GGUF file, Hugging Face directory or dummy:<shape>; "
        "default: the bundled SmolLM2-135M-Instruct",
    )
    generate.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 is off")
    generate.add_argument("--top-k", type=int, default=0, help="0 means off")
    generate.add_argument("--min-p", type=float, default=0.0, help="0 means off")
    generate.add_argument("--seed", type=int, default=None, help="for reproducible sampling")
    generate.add_argument("--stop", action="append", default=[], help="a stop string (repeat)")
    generate.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    add_dtype_argument(generate, "weights and activations")
    generate.add_argument(
        "--json", action="store_true", help="print one JSON object with token ids, text and usage"
    )
    generate.add_argument(
        "--no-cache",
        action="store_true",
        help="neither read nor write the converted weights of a GGUF model in the cache folder "
        "($TANDEM_CACHE_DIR, else ~/.cache/tandem), which makes repeated loads fast",
    )
    add_quantization_arguments(generate)
    generate.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="split the model over N processes on this host (one GPU each on CUDA)",
    )
    generate.set_defaults(handler=run_generate)

    calibrate = commands.add_parser(
        "calibrate-kv", help="write a model's per-head FP8 KV scales for workers to share"
    )
    calibrate.add_argument("--out", required=True, metavar="PATH", help="the JSON file to write")
    calibrate.add_argument("--model", default=None, help="as for generate (default: bundled model)")
    calibrate.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    add_dtype_argument(calibrate, "as the workers run the model")
    calibrate.add_argument(
        "--quantization", default=None, choices=("fp8",), help="as the workers run it"
    )
    calibrate.add_argument(
        "--fp8-weight-calibration", default=None, choices=("gptq",), help="as the workers run it"
    )
    calibrate.set_defaults(handler=run_calibrate_kv)

    serve = commands.add_parser("serve", help="serve the gRPC API from a pool of Ray workers")
    serve.add_argument("--model", default=None, help="as for generate (default: bundled model)")
    add_pool_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address the gRPC API listens on")
    serve.add_argument("--port", type=int, default=50051, help="gRPC port; 0: any free port")
    serve.add_argument("--address", default=None, help="a Ray cluster to join (default: local)")
    serve.add_argument(
        "--http-port", type=int, default=None,
        help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /health) on this port of --host; 0: any free port. Default: off",
    )  # fmt: skip
    serve.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="on SIGTERM or Ctrl-C: seconds requests in flight get to finish before they are "
        "cancelled (new requests are refused at once)",
    )
    add_quantization_arguments(serve)
    add_security_arguments(serve)
    serve.set_defaults(handler=run_serve)

    client = commands.add_parser("client", help="stream one answer from a running service")
    client.add_argument("prompt", help="the prompt text")
    add_prompt_form_arguments(client)
    client.add_argument("--target", default="127.0.0.1:50051", help="the service, HOST:PORT")
    client.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    client.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    client.add_argument("--timeout", type=float, default=300.0, help="seconds for the answer")
    add_connection_arguments(client)
    client.set_defaults(handler=run_client)

    demo = commands.add_parser(
        "demo", help="start the service locally, stream a few concurrent answers, stop"
    )
    demo.add_argument("prompts", nargs="*", default=list(DEMO_PROMPTS), help="questions to ask")
    demo.add_argument("--model", default=None, help="as for generate (default: bundled model)")
    add_pool_arguments(demo)
    demo.add_argument("--max-tokens", type=int, default=96, help="tokens per answer at most")
    demo.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    demo.set_defaults(handler=run_demo)

    bench = commands.add_parser("bench", help="measure a running service under load")
    add_bench_arguments(bench)

    from planner.cli import add_plan_arguments, add_profile_arguments  # argparse only: cheap

    add_profile_arguments(commands.add_parser("profile", help="measure this machine's engine"))
    add_plan_arguments(commands.add_parser("plan", help="predict goodput per configuration"))
    drain = commands.add_parser("drain-node", help="drain a node's workers through the router")
    add_drain_node_arguments(drain)
    drain.set_defaults(handler=run_drain_node)
    node = commands.add_parser(
        "node", help="run Ray on this node; on SIGTERM drain it through the router, then stop"
    )
    add_node_arguments(node)
    node.set_defaults(handler=run_node)
    parser.commands = dict(commands.choices)
    return parser


def add_prompt_form_arguments(parser: argparse.ArgumentParser) -> None:
    form = parser.add_mutually_exclusive_group()
    form.add_argument(
        "--raw",
        dest="chat",
        action="store_false",
        default=None,
        help="send the prompt text as is, without the model's chat template",
    )
    form.add_argument(
        "--chat",
        dest="chat",
        action="store_true",
        default=None,  # None: the model's chat template if it has one
        help="send the prompt as a user message in the model's chat template (the default "
        "when the model has one; an error when it has none)",
    )


# Questions the bundled 135M model answers correctly (greedy); it is a demo, not an oracle.
DEMO_PROMPTS = (
    "What is the capital of France?",
    "What is the capital of Japan?",
    "What is the chemical symbol for water?",
    "What is the boiling point of water in Celsius?",
)
TINY_MODEL_NOTE = (
    "tandem: the bundled SmolLM2-135M-Instruct is a tiny demo model (135M parameters): expect "
    "simple, sometimes wrong answers. Serve another with --model path/to/model.gguf or a "
    "Hugging Face directory."
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

    async def ask(stub: object, prompt: str) -> tuple[str, float, float, int, bool]:
        request = pb.GenerateRequest(sampling=pb.SamplingParameters(max_tokens=args.max_tokens))
        request.chat.messages.add(role="user", content=prompt)
        started = time.monotonic()
        first = None
        text, tokens, cut = [], 0, False
        async for response in stub.Generate(request, timeout=600):  # type: ignore[attr-defined]
            if first is None:
                first = time.monotonic() - started
            text.append(response.text)
            tokens += len(response.token_ids)
            cut = response.finish_reason == pb.FINISH_REASON_LENGTH
        total = time.monotonic() - started
        return "".join(text), first or total, total, tokens, cut

    async def demo() -> None:
        service = Service(config)
        pools = (
            f"{args.prefill_workers} prefill + {args.decode_workers} decode workers"
            if args.mode == "disaggregated"
            else f"{args.workers} colocated workers"
        )
        print(f"tandem: starting {pools} (local Ray) ...", flush=True)
        if args.model is None:
            print(TINY_MODEL_NOTE, flush=True)
        await service.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                stub = tandem_pb2_grpc.TandemStub(channel)
                print(f"tandem: serving on port {service.port}; {len(args.prompts)} concurrent "
                      "requests\n", flush=True)  # fmt: skip
                results = await asyncio.gather(*(ask(stub, p) for p in args.prompts))
            for prompt, (text, ttft, total, tokens, cut) in zip(args.prompts, results, strict=True):
                rate = (tokens - 1) / (total - ttft) if tokens > 1 and total > ttft else 0.0
                answer = text.strip() + (" ..." if cut else "")
                ending = f"; cut short at --max-tokens {args.max_tokens}" if cut else ""
                print(f"> {prompt}\n{answer}\n[TTFT {1000 * ttft:.0f} ms, {tokens} tokens, "
                      f"{rate:.1f} tokens/s{ending}]\n")  # fmt: skip
        finally:
            await service.stop()
        print("tandem: stopped", flush=True)

    asyncio.run(demo())
    return 0


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """Who may call `tandem serve` and over what (docs/operations.md, "Security"); all off by
    default, for local use."""
    group = parser.add_argument_group("security (off by default)")
    group.add_argument(
        "--api-keys-file",
        default=None,
        help="API keys, one 'tenant:key' or 'tenant:key:max_inflight' per line; every call "
        "must then send 'authorization: Bearer <key>'. Default: $TANDEM_API_KEYS (same "
        "format, commas allowed), else no authentication",
    )
    group.add_argument(
        "--tenant-max-inflight",
        type=int,
        default=None,
        help="requests in flight per tenant at most, for tenants whose key sets none "
        "(RESOURCE_EXHAUSTED past it); needs API keys",
    )
    group.add_argument(
        "--admin-keys-file",
        default=None,
        help="admin keys, one 'name:key' per line, for the Admin service (`tandem drain-node`); "
        "not tenant keys. Default: $TANDEM_ADMIN_KEYS, else the Admin service refuses calls",
    )
    group.add_argument("--tls-cert", default=None, help="serve over TLS: PEM certificate chain")
    group.add_argument("--tls-key", default=None, help="its PEM private key")
    group.add_argument(
        "--tls-client-ca",
        default=None,
        help="mutual TLS: PEM roots every client certificate must chain to",
    )


def security_config(args: argparse.Namespace) -> tuple[Any, Any]:
    """(router.auth.ApiKeys or None, router.tls.TlsConfig) from the flags of
    add_security_arguments (commands without them: both off)."""
    from router.auth import ENV_API_KEYS, load_api_keys
    from router.tls import TlsConfig

    if not hasattr(args, "api_keys_file"):  # `tandem demo`: its own local client, no keys
        return None, TlsConfig()
    tls = TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca)
    keys = load_api_keys(args.api_keys_file, default_max_inflight=args.tenant_max_inflight)
    os.environ.pop(ENV_API_KEYS, None)  # read: processes started from here (Ray) never see it
    return keys, tls


def add_dtype_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help=f"{what}; auto: bfloat16 on cuda, float32 on cpu",
    )


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantization", default=None, choices=("fp8",), help="fp8: e4m3 W8A8 projections"
    )
    parser.add_argument(
        "--fp8-weight-calibration",
        default=None,
        choices=("gptq",),
        help="with --quantization fp8: round the weights by GPTQ on a calibration text (less "
        "loss than rounding each to nearest, the same FP8 format; a few seconds per layer at "
        "load, tensor-parallel size 1)",
    )
    parser.add_argument(
        "--kv-cache-dtype", default="auto", choices=("auto", "fp8"), help="fp8: e4m3 KV cache"
    )
    parser.add_argument(
        "--kv-cache-scales",
        default="per-head",
        choices=("per-head", "per-token"),
        help="an FP8 KV cache's scales: per-head (calibrated at start-up, half a bf16 cache) "
        "or per-token (inside each block, no calibration, 3%% larger)",
    )
    parser.add_argument(
        "--kv-cache-scales-file",
        default=None,
        metavar="PATH",
        help="per-head FP8 KV scales to load instead of calibrating (`tandem calibrate-kv` "
        "writes one): workers that load the same file pair whatever their tensor-parallel size",
    )


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
        "(decode pool: the cached share of the prompt against load; 0: place by load alone)",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port"
    )
    disagg = parser.add_argument_group("prefill placement (disaggregated mode)")
    disagg.add_argument(
        "--disagg",
        default=None,
        choices=("always", "never", "auto"),
        help="where each request is prefilled: always on the prefill pool (KV shipped), never "
        "(on its decode worker), or auto: per request (default; docs/operations.md)",
    )
    disagg.add_argument("--disagg-local-max-tokens", type=int, default=None,
                        help="auto: uncached prompts of at most this many tokens prefill on "
                        "their decode worker (default 256)")  # fmt: skip
    disagg.add_argument("--disagg-prefill-queue-tokens", type=int, default=None,
                        help="auto: the prefill pool's shortest queue (prompt tokens) at which "
                        "any prompt prefills on its decode worker (default 8192)")  # fmt: skip
    disagg.add_argument("--disagg-decode-max-load", type=float, default=None,
                        help="auto: decode load (running/max sequences + KV fraction used, "
                        "0-2) at which prompts go to the prefill pool (default 1.0); with "
                        "--target-itl-ms, a decode worker whose streams' ITL reached it "
                        "prefills nothing")  # fmt: skip
    admission = parser.add_argument_group("admission (RESOURCE_EXHAUSTED past any bound)")
    admission.add_argument("--max-requests", type=int, default=256,
                           help="requests in flight, prefill and decode together")  # fmt: skip
    admission.add_argument("--max-prompt-tokens", type=int, default=None,
                           help="prompt tokens of the requests in flight (default: the decode "
                           "pool's KV capacity, as its workers report it)")  # fmt: skip
    admission.add_argument("--max-request-bytes", type=int, default=64 << 20,
                           help="serialized bytes of the requests in flight")  # fmt: skip
    parser.add_argument(
        "--max-migrations",
        type=int,
        default=3,
        help="how many times one stream may resume on another decode worker after losing its "
        "own (replayed: no token repeated or missing); past it, UNAVAILABLE. 0: never",
    )
    parser.add_argument(
        "--drain-move-kv",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a draining decode worker ships its running streams' KV to the others over the "
        "KV-transfer layer (--no-drain-move-kv: they are replayed, recomputed there)",
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
    add_engine_arguments(parser)
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
    scaling.add_argument(
        "--autoscale-ratio-profile",
        default=None,
        metavar="PROFILE",
        help="disaggregated: size the prefill pool to the decode pool at the "
        "prefill:decode split saved in this profile (tandem plan --save-ratio)",
    )
    scaling.add_argument("--target-itl-ms", type=float, default=None,
                         help="decode: inter-token latency p90; disaggregated, also what "
                         "--disagg auto protects and what caps the decode workers' prefill "
                         "chunks")  # fmt: skip


# Engine knobs of `tandem serve`: (flag, EngineConfig or SchedulerConfig field, type, help).
_ENGINE_KNOBS = (
    ("max-num-seqs", "max_num_seqs", int, "running sequences per worker (GPU default 256)"),
    ("max-num-batched-tokens", "max_num_batched_tokens", int,
     "tokens per engine step (GPU default 8192)"),
    ("kv-cache-memory-fraction", "kv_cache_memory_fraction", float,
     "GPU: KV cache as a fraction of the memory free after the weights (default 0.85)"),
    ("max-model-len", "max_model_len", int, "longest sequence (default: the model's context)"),
    ("tensor-parallel-size", "tensor_parallel_size", int,
     "processes (GPUs) per worker, the model split across them (default 1)"),
)  # fmt: skip


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Per-pool engine knobs: `--X` sets every pool, `--prefill-X` / `--decode-X` one pool
    (disaggregated mode; colocated workers take `--decode-X`). Unset: sized for the device."""
    group = parser.add_argument_group("engine (per pool; unset: sized for the device)")
    for flag, _, kind, text in _ENGINE_KNOBS:
        group.add_argument(f"--{flag}", type=kind, default=None, help=text)
        for pool in ("prefill", "decode"):
            group.add_argument(f"--{pool}-{flag}", type=kind, default=None, help=argparse.SUPPRESS)


def engine_config(args: argparse.Namespace, pool: str) -> Any:
    """The EngineConfig of one pool ("prefill" or "decode") from the command line."""
    from engine.config import EngineConfig, default_scheduler_config
    from engine.scheduler import SchedulerConfig

    values = {}
    for flag, name, _, _ in _ENGINE_KNOBS:
        attr = flag.replace("-", "_")
        value = getattr(args, f"{pool}_{attr}", None)
        values[name] = getattr(args, attr, None) if value is None else value
    scheduler = None
    if values["max_num_seqs"] is not None or values["max_num_batched_tokens"] is not None:
        device = "cpu" if args.device == "cpu" else "cuda"  # "auto": GPU sizes fill the gaps
        base = default_scheduler_config(device, total_memory_bytes=1 << 62)
        scheduler = SchedulerConfig(
            max_num_seqs=values["max_num_seqs"] or base.max_num_seqs,
            max_num_batched_tokens=values["max_num_batched_tokens"] or base.max_num_batched_tokens,
        )
    fraction, tp_size = values["kv_cache_memory_fraction"], values["tensor_parallel_size"]
    # a decode worker that prefills (--disagg) keeps its streams' steps under --target-itl-ms
    itl_ms = getattr(args, "target_itl_ms", None)
    protects = pool == "decode" and getattr(args, "mode", None) == "disaggregated"
    return EngineConfig(
        target_itl_s=itl_ms / 1000 if protects and itl_ms is not None else None,
        model=args.model,
        device=args.device,
        quantization=getattr(args, "quantization", None),
        fp8_weight_calibration=getattr(args, "fp8_weight_calibration", None),
        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
        kv_cache_scales=getattr(args, "kv_cache_scales", "per-head").replace("-", "_"),
        kv_cache_scales_path=getattr(args, "kv_cache_scales_file", None),
        scheduler=scheduler,
        max_model_len=values["max_model_len"],
        tensor_parallel_size=1 if tp_size is None else tp_size,
        **({} if fraction is None else {"kv_cache_memory_fraction": fraction}),
    )


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
    return AutoscalingConfig(enabled=True, prefill=policies["prefill"], decode=policies["decode"],
                             prefill_decode_ratio=_profile_ratio(args))  # fmt: skip


def _profile_ratio(args: argparse.Namespace) -> tuple[int, int] | None:
    """The split saved in --autoscale-ratio-profile's profile (planner.profile)."""
    path = getattr(args, "autoscale_ratio_profile", None)
    if path is None:
        return None
    from planner.profile import load_profile

    ratio = load_profile(path).prefill_decode_ratio
    if ratio is None:
        raise ValueError(f"--autoscale-ratio-profile {path}: the profile holds no split; "
                         "write one with tandem plan --profile ... --save-ratio")  # fmt: skip
    if args.mode != "disaggregated":
        raise ValueError("--autoscale-ratio-profile: only disaggregated mode has two pools")
    return ratio


_POOL_SIGNALS = {"prefill": ("queued_tokens", "ttft"), "decode": ("kv_usage", "itl")}


_DISAGG_FLAGS = {  # flag attribute: DisaggPolicy field
    "disagg_local_max_tokens": "local_max_tokens",
    "disagg_prefill_queue_tokens": "prefill_queue_tokens",
    "disagg_decode_max_load": "decode_max_load",
}


def admission_limits(args: argparse.Namespace) -> Any:
    """The admission bounds (router.admission) from the command line."""
    from router.admission import AdmissionLimits

    try:
        return AdmissionLimits(
            max_requests=args.max_requests,
            max_prompt_tokens=args.max_prompt_tokens,
            max_request_bytes=args.max_request_bytes,
        )
    except ValueError as e:
        raise ValueError(f"admission: {e}") from None


def failover_config(args: argparse.Namespace) -> Any:
    """How lost streams resume (router.failover) from the command line."""
    from router.failover import FailoverConfig

    try:
        return FailoverConfig(
            max_migrations=args.max_migrations, move_kv_on_drain=args.drain_move_kv
        )
    except ValueError as e:
        raise ValueError(f"--max-migrations: {e}") from None


def disagg_policy(args: argparse.Namespace) -> Any:
    """Where disaggregated requests prefill (router.disagg) from the command line: auto by
    default; colocated mode refuses the flags."""
    from router.disagg import DisaggPolicy

    given = {field: getattr(args, flag) for flag, field in _DISAGG_FLAGS.items()
             if getattr(args, flag, None) is not None}  # fmt: skip
    if args.mode == "colocated":
        if args.disagg is not None or given:
            raise ValueError("--disagg and its thresholds apply to --mode disaggregated only")
        return DisaggPolicy()
    itl_ms = getattr(args, "target_itl_ms", None)
    try:
        return DisaggPolicy(
            mode=args.disagg or "auto",
            target_itl_s=None if itl_ms is None else itl_ms / 1000,
            **given,
        )
    except ValueError as e:
        raise ValueError(f"--disagg: {e}") from None


def pool_config(args: argparse.Namespace, port: int) -> Any:
    import os

    from cluster.service import ServiceConfig
    from kvtransfer.network import KVNetworkConfig
    from prefix_cache.index import IndexConfig
    from telemetry.tracing import TracingConfig

    api_keys, tls = security_config(args)
    admin_keys = admin_keys_of(args)
    index = IndexConfig(
        redis_url=args.redis_url,
        redis_password=os.environ.get("TANDEM_REDIS_PASSWORD") or None,
        redis_tls_ca_file=args.redis_tls_ca_file,
    )
    return ServiceConfig(
        index=index,
        cache_weight=args.cache_weight,
        disagg=disagg_policy(args),
        failover=failover_config(args),
        admission=admission_limits(args),
        metrics_port=args.metrics_port,
        tracing=TracingConfig(otlp_endpoint=args.otlp_endpoint),
        kv_network=KVNetworkConfig.from_environment(args.kv_interface, args.kv_ports),
        autoscaling=autoscaling_config(args),
        prefill_resources=args.prefill_resources,
        decode_resources=args.decode_resources,
        engine=engine_config(args, "decode"),
        prefill_engine=engine_config(args, "prefill"),
        mode=args.mode,
        num_workers=args.workers,
        num_prefill_workers=args.prefill_workers,
        num_decode_workers=args.decode_workers,
        host=getattr(args, "host", "127.0.0.1"),
        port=port,
        http_port=getattr(args, "http_port", None),
        address=getattr(args, "address", None),
        gpus_per_worker=1.0 if args.device == "cuda" else 0.0,
        verbose=args.verbose,
        api_keys=api_keys,
        tls=tls,
        admin_keys=admin_keys,
    )


def admin_keys_of(args: argparse.Namespace) -> Any:
    """The Admin service's keys (router.admin) from --admin-keys-file or $TANDEM_ADMIN_KEYS;
    None when neither is given. The variable is dropped once read (Ray never sees it)."""
    from router.admin import ENV_ADMIN_KEYS, load_admin_keys

    keys = load_admin_keys(getattr(args, "admin_keys_file", None))
    os.environ.pop(ENV_ADMIN_KEYS, None)
    return keys


def run_serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from cluster.service import Service

    config = pool_config(args, args.port)
    if not args.shutdown_grace >= 0:
        raise ValueError(f"--shutdown-grace={args.shutdown_grace} must be >= 0 seconds")

    async def serve() -> None:
        service = Service(config)
        signals = asyncio.Queue[int]()
        loop = asyncio.get_running_loop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, signals.put_nowait, int(sig))
        starting = asyncio.create_task(service.start())
        stopping = asyncio.create_task(signals.get())
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped while loading: give up the start, stop what started
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            print("tandem: stopped before serving", flush=True)
            return
        starting.result()  # raises what start raised (after start stopped what it started)
        print(f"tandem: serving on {config.host}:{service.port}", flush=True)
        if service.http_port is not None:
            print(f"tandem: OpenAI-compatible HTTP on http://{config.host}:{service.http_port}/v1",
                  flush=True)  # fmt: skip
        signum = await stopping
        gate = service.gate
        in_flight = gate.num_streams if gate else 0
        print(f"tandem: {signal.Signals(signum).name}: stopping; {in_flight} requests in flight "
              f"get up to {args.shutdown_grace:g} s to finish (signal again to cut them now)",
              flush=True)  # fmt: skip
        shutdown = asyncio.create_task(service.shutdown(args.shutdown_grace))
        again = asyncio.create_task(signals.get())
        await asyncio.wait((shutdown, again), return_when=asyncio.FIRST_COMPLETED)
        if again.done() and gate is not None:
            gate.cut("shutting down: the server was told to stop at once")
        again.cancel()
        num_cut = await shutdown
        if num_cut:
            print(f"tandem: {num_cut} requests cut at the end of the grace period", flush=True)
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
    from bench.serving.connection import connection_of, open_channel

    started = time.monotonic()
    tls, metadata = connection_of(args)
    with open_channel(args.target, tls) as channel:
        stub = tandem_pb2_grpc.TandemStub(channel)
        wrote_text = False
        try:
            chat = args.chat
            if chat is None:  # the model's chat template when it has one
                models = stub.ListModels(
                    pb.ListModelsRequest(), timeout=min(args.timeout, 30), metadata=metadata
                )
                chat = any(model.has_chat_template for model in models.models)
            if chat:
                request.chat.messages.add(role="user", content=args.prompt)
            else:
                request.text = args.prompt
            last = None
            for response in stub.Generate(request, timeout=args.timeout, metadata=metadata):
                sys.stdout.write(response.text)
                sys.stdout.flush()
                wrote_text = wrote_text or bool(response.text)
                last = response
        except grpc.RpcError as e:
            if wrote_text:
                sys.stdout.write("\n")
            print(f"tandem: {describe_rpc_error(e, args.target)}", file=sys.stderr)
            return 2
    elapsed = time.monotonic() - started
    if last is not None:
        tokens = last.usage.completion_tokens
        ending = _ENDINGS.get(pb.FinishReason.Name(last.finish_reason), "")
        print(f"\n[{tokens} tokens in {elapsed:.2f} s; {last.usage.prompt_tokens} prompt tokens"
              f"{ending}]")  # fmt: skip
    return 0


_ENDINGS = {"FINISH_REASON_LENGTH": "; cut short: reached --max-tokens or the model's context"}


def describe_rpc_error(error: Any, target: str) -> str:
    """One line for a failed call; an unreachable server gets a hint on what to check."""
    import grpc

    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and (
        "failed to connect" in details.lower() or "connection refused" in details.lower()
    ):
        return (
            f"cannot reach a Tandem server at {target}: is `tandem serve` running there "
            f"(or pass --target HOST:PORT)? ({details})"
        )
    return f"{code.name}: {details}"


def run_calibrate_kv(args: argparse.Namespace) -> int:
    """Calibrate a model's per-head FP8 KV scales once (engine.kv_calibration) and write them
    for `--kv-cache-scales-file`."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.kv_calibration import save_kv_scales

    engine = Engine(
        EngineConfig(
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            quantization=args.quantization,
            fp8_weight_calibration=args.fp8_weight_calibration,
            kv_cache_dtype="fp8",
            kv_cache_scales="per_head",
            num_kv_blocks=1,
            cuda_graphs=False,
        )
    )
    assert engine.kv_scales_table is not None, "a per-head FP8 engine calibrates"
    save_kv_scales(args.out, engine.kv_scales_table, engine.model_id)
    print(f"tandem: wrote {args.out}: {engine.model_id}'s per-head FP8 KV scales, "
          f"digest {engine.kv_scales_digest}")  # fmt: skip
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from contracts.sampling_params import SamplingParams
    from engine.config import EngineConfig
    from engine.engine import Engine

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
    started = time.monotonic()
    print(f"tandem: loading {args.model or 'the bundled SmolLM2-135M-Instruct'} ...",
          file=sys.stderr, flush=True)  # fmt: skip
    engine = Engine(
        EngineConfig(
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            converted_cache=not args.no_cache,
            quantization=args.quantization,
            fp8_weight_calibration=args.fp8_weight_calibration,
            kv_cache_dtype=args.kv_cache_dtype,
            kv_cache_scales=args.kv_cache_scales.replace("-", "_"),
            kv_cache_scales_path=args.kv_cache_scales_file,
            tensor_parallel_size=args.tensor_parallel_size,
        )
    )
    print(f"tandem: {engine.model_id} loaded in {time.monotonic() - started:.1f} s "
          f"({engine.device.type})", file=sys.stderr, flush=True)  # fmt: skip
    chat = args.chat
    if chat is None:
        chat = engine.tokenizer is not None and engine.tokenizer.has_chat_template
    messages = [{"role": "user", "content": args.prompt}] if chat else None
    token_ids: list[int] = []
    text: list[str] = []
    last = None
    prompt = None if chat else args.prompt
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
    if last.finish_reason.value == "length":
        limit = "--max-tokens" if len(token_ids) >= args.max_tokens else "the model's context"
        print(f"tandem: the answer was cut short after {len(token_ids)} tokens: it reached "
              f"{limit}", file=sys.stderr)  # fmt: skip
    engine.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the (sub)command's own parser, with its usage
        command = parser.commands.get(args.command or "", parser)
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.error(
            "choose a command: generate, serve, client, demo, bench, profile, plan, drain-node, "
            "node or calibrate-kv (see --help)"
        )
    configure_logging(args.verbose)
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


def configure_logging(verbose: bool) -> None:
    """Tandem's own warnings by default; --verbose adds INFO and the logs of Ray and gRPC's
    core (fork-handler notes, Ray's start-up banners), which are silenced otherwise."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # read by gRPC's core when it loads, and by every process Ray starts
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


if __name__ == "__main__":
    sys.exit(main())

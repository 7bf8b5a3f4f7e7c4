"""`tandem profile` and `tandem plan` (docs/operations.md, "Capacity planning").

    tandem profile [--model M] [--device cpu|cuda] [--prefill-tokens 16,64,...] [--out P]
    tandem plan --profile P --gpus N [--workload mixed ...] [--rates 1,2,4] [--slo ...]

Importing this module is cheap (argparse only): torch loads only when `tandem profile` runs.
Exit codes as `tandem`'s: 0 done, 2 a bad argument or a bad profile file (ProfileError).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.serving.cli import add_workload_shape_arguments, parse_rates

WORKLOADS = ("mixed", "random", "shared-prefix")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of ints like 16,64,256") from None


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="as for serve (default: bundled model); "
                        "dummy:llama-3-8b for that shape with dummy weights")  # fmt: skip
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prefill-tokens", type=_ints, default=(16, 64, 256, 512),
                        help="prefill chunk sizes measured")  # fmt: skip
    parser.add_argument("--prefill-context", type=_ints, default=(0, 512),
                        help="tokens already cached before the chunk")  # fmt: skip
    parser.add_argument("--decode-batch", type=_ints, default=(1, 8, 32))
    parser.add_argument("--decode-context", type=_ints, default=(64, 512))
    parser.add_argument("--transfer-bytes", type=_ints, default=(1 << 16, 1 << 20, 1 << 24))
    parser.add_argument("--transfer-gbps", type=float, default=None,
                        help="transfer times from this bandwidth (measured elsewhere, e.g. by "
                        "bench.kvtransfer_nccl) instead of a gloo pair here")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads, as a Ray worker of one CPU runs")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs per point (all kept, the plan draws on them)")  # fmt: skip
    parser.add_argument("--decode-steps", type=int, default=4, help="timed steps per decode point")
    parser.add_argument("--mixed-tokens", type=_ints, default=(64, 256),
                        help="fresh chunks measured beside decodes")  # fmt: skip
    parser.add_argument("--mixed-batch", type=_ints, default=(0, 8, 32),
                        help="decodes beside each chunk; 0 first (the chunk alone)")  # fmt: skip
    parser.add_argument("--mixed-context", type=int, default=256,
                        help="those decodes' context tokens")  # fmt: skip
    parser.add_argument("--no-mixed", action="store_true", help="measure no mixed steps")
    parser.add_argument("--loop-requests", type=int, default=8,
                        help="loop overhead: requests one at a time (0: none)")  # fmt: skip
    parser.add_argument("--loop-batch", type=int, default=8,
                        help="loop overhead: then this many at once")  # fmt: skip
    parser.add_argument("--service-requests", type=int, default=0,
                        help="then time N requests through a real tandem serve of one "
                        "worker (router, Ray, gRPC): the overhead outside engine steps "
                        "(replaces the engine loop's); 0: the engine loop's only")  # fmt: skip
    parser.add_argument("--service-batch", type=int, default=8,
                        help="... then this many at once through it")  # fmt: skip
    parser.add_argument("--service-timeout", type=float, default=900.0,
                        help="seconds for that service to start")  # fmt: skip
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="the serving engine's (recorded; default: the device's)")  # fmt: skip
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="the serving engine's (recorded; default: the device's)")  # fmt: skip
    parser.add_argument("--kv-cache-gb", type=float, default=None)
    parser.add_argument("--out", default="profile.json", help="the profile's JSON file")
    parser.set_defaults(handler=run_profile)


def run_profile(args: argparse.Namespace) -> int:
    from planner.measure import ProfileConfig, measure_profile

    config = ProfileConfig(
        model=args.model, device=args.device, dtype=args.dtype,
        prefill_tokens=args.prefill_tokens, prefill_context=args.prefill_context,
        decode_batch=args.decode_batch, decode_context=args.decode_context,
        transfer_bytes=args.transfer_bytes, repeats=args.repeats, threads=args.threads,
        transfer_gbps=args.transfer_gbps, decode_steps=args.decode_steps,
        mixed_tokens=() if args.no_mixed else args.mixed_tokens, mixed_batch=args.mixed_batch,
        mixed_context=args.mixed_context, loop_requests=args.loop_requests,
        loop_batch=args.loop_batch,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_bytes=None if args.kv_cache_gb is None else int(args.kv_cache_gb * 2**30),
    )  # fmt: skip
    if args.service_requests < 0 or args.service_batch < 1:
        raise ValueError(f"--service-requests={args.service_requests} must be >= 0 and "
                         f"--service-batch={args.service_batch} >= 1")  # fmt: skip
    profile = measure_profile(config)
    print(f"profile: {profile.save(args.out)}")
    if args.service_requests:  # the profile so far is kept if the service fails
        print(f"profile: {with_service_overhead(profile, args).save(args.out)} (service overhead)")
    return 0


def with_service_overhead(profile: Any, args: argparse.Namespace) -> Any:
    """The profile with its overhead measured through a real service of the same engine
    (started once the profile's engine is gone: its memory is the service's)."""
    import gc
    from dataclasses import replace

    import torch

    from planner.overhead import measure_service_overhead

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    serve = ["--device", args.device, "--max-num-seqs", str(profile.max_num_seqs),
             "--max-num-batched-tokens", str(profile.max_num_batched_tokens)]  # fmt: skip
    if args.model:
        serve += ["--model", args.model]
    log = Path(f"{args.out}.serve.log")
    overhead = measure_service_overhead(profile, serve, args.service_requests,
                                        args.service_batch, args.decode_steps, log,
                                        args.service_timeout)  # fmt: skip
    print(f"service: {overhead.describe()}")
    return replace(profile, overhead=overhead)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True, help="a file written by tandem profile")
    parser.add_argument("--gpus", type=int, required=True, help="workers (GPUs) to plan for")
    parser.add_argument("--workload", default="mixed", choices=WORKLOADS)
    parser.add_argument("--num-prompts", type=int, default=256, help="requests per rate")
    parser.add_argument("--rates", type=parse_rates, default=[1.0, 2.0, 4.0], help="req/s")
    parser.add_argument("--seed", type=int, default=0, help="as tandem bench's: same requests")
    parser.add_argument("--slo", default="ttft=500ms,tpot=30ms")
    parser.add_argument("--without", default="",
                        help="leave out of the simulation what the profile measured: any of "
                        "spread,mixed,overhead (to see what each changes)")  # fmt: skip
    parser.add_argument("--configurations", default=None,
                        help="only these, e.g. colocated,1P1D (default: every one)")  # fmt: skip
    add_workload_shape_arguments(parser)  # as tandem bench's: the same requests
    placement = parser.add_argument_group("placement (as tandem serve's)")
    placement.add_argument("--target-itl-ms", type=float, default=None)
    placement.add_argument("--disagg-local-max-tokens", type=int, default=256)
    placement.add_argument("--disagg-prefill-queue-tokens", type=int, default=8192)
    placement.add_argument("--disagg-decode-max-load", type=float, default=1.0)
    results = parser.add_argument_group("results")
    results.add_argument("--out", default=None, help="also write the predictions as JSON")
    results.add_argument("--plot", default="plan.png", help="goodput and TTFT against rate")
    results.add_argument("--no-plot", action="store_true")
    results.add_argument("--save-ratio", action="store_true",
                         help="write the best split into the profile (tandem serve "
                         "--autoscale-ratio-profile reads it)")  # fmt: skip
    parser.set_defaults(handler=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from bench.serving.slo import parse_slo
    from bench.serving.workload import workload_from_args
    from planner import plan
    from planner.profile import load_profile, save_ratio
    from router.disagg import DisaggPolicy

    profile = load_profile(args.profile).without(tuple(filter(None, args.without.split(","))))
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts={args.num_prompts} must be >= 1")
    target_itl_s = None if args.target_itl_ms is None else args.target_itl_ms / 1000
    auto = DisaggPolicy("auto", args.disagg_local_max_tokens, args.disagg_prefill_queue_tokens,
                        args.disagg_decode_max_load, target_itl_s)  # fmt: skip
    candidates = plan.layouts(args.gpus, auto)
    if args.configurations:
        wanted = args.configurations.split(",")
        unknown = set(wanted) - {c.name for c in candidates}
        if unknown:
            raise ValueError(f"--configurations: unknown {sorted(unknown)} for {args.gpus} GPUs; "
                             f"known: {[c.name for c in candidates]}")  # fmt: skip
        candidates = [c for c in candidates if c.name in wanted]
    slo = parse_slo(args.slo)
    predictions = plan.plan(profile, candidates, workload_from_args(args), args.rates, slo,
                            args.num_prompts, args.seed, target_itl_s)  # fmt: skip
    print(f"profile: {profile.model} on {profile.device} ({args.profile}); {args.gpus} GPUs; "
          f"SLO {slo.describe()}; {args.num_prompts} requests per rate (simulated)\n"
          f"modelled: {profile.modelled()}\n")  # fmt: skip
    print(plan.table(predictions))
    best = plan.recommend(predictions)
    print(f"\nrecommended: {best.layout} (predicted goodput {best.summary.goodput or 0:.2f} "
          f"req/s at {best.rate:g} req/s)")  # fmt: skip
    ratio = plan.best_ratio(predictions)
    if ratio is not None:
        print(f"best prefill:decode split: {ratio[0]}:{ratio[1]}")
        if args.save_ratio:
            save_ratio(args.profile, ratio)
            print(f"saved it in {args.profile}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "profile": args.profile, "gpus": args.gpus, "slo": slo.describe(),
            "recommended": best.layout, "prefill_decode_ratio": ratio,
            "predictions": plan.to_json(predictions)}, indent=1) + "\n")  # fmt: skip
        print(f"predictions: {args.out}")
    if not args.no_plot:
        written = plan.write_plot(predictions, args.plot)
        print(f"plot: {written}" if written else "plot: skipped (matplotlib is not installed)")
    return 0

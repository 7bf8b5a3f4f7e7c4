"""How late a polling thread notices a completion: kvtransfer.nccl's `_poll` at Linux's default
timer slack (50 us) against the slack it sets for itself (`fine_timer_slack`, 1 us), on the
CPU: a stand-in event completes at a random instant, the delay is until `_poll` returns; the
modes interleave beside several loads (idle, a spinning process, a CPU engine, a Python loop).

    python -m bench.poll_latency [--samples 2000] [--rounds 5] [--loads idle,process,...]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import sys
import threading
import time
from typing import Any

from kvtransfer import nccl


class _CompletesAt:
    """Stand-in for a CUDA event: done from `at` (time.perf_counter) on."""

    def __init__(self, at: float) -> None:
        self.at = at

    def query(self) -> bool:
        return time.perf_counter() >= self.at


def delays_us(samples: int, fine: bool, seed: int) -> list[float]:
    """Detection delays (microseconds) of `samples` completions polled on a new thread,
    at fine timer slack or the default one."""
    out: list[float] = []

    def run() -> None:
        if fine:
            nccl.fine_timer_slack()
        else:  # _poll would cut it: mark this thread as done so it keeps the default
            nccl._thread_state.slack_set = True
        rng = random.Random(seed)
        for _ in range(samples):
            event = _CompletesAt(time.perf_counter() + rng.uniform(0, 200e-6))
            nccl._poll(event, time.monotonic() + 1.0)
            out.append((time.perf_counter() - event.at) * 1e6)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out


def _spin(stop: Any) -> None:
    while not stop.is_set():
        pass


class _Load:
    """What else runs while the poller polls: nothing; a process spinning on the other core;
    in this process, a CPU engine stepping a decode batch of 8 (SmolLM2, whose torch ops
    release the GIL while they run); or a pure-Python loop (the worst case: the poller waits
    for the GIL up to sys.getswitchinterval() at every wake)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._stop: Any = mp.Event() if kind == "process" else threading.Event()
        self._worker: Any = None

    def __enter__(self) -> _Load:
        if self.kind == "process":
            self._worker = mp.Process(target=_spin, args=(self._stop,), daemon=True)
        elif self.kind == "engine":
            engine = _engine()
            self._worker = threading.Thread(target=_step, args=(engine, self._stop))
        elif self.kind == "python":
            self._worker = threading.Thread(target=_spin, args=(self._stop,))
        if self._worker is not None:
            self._worker.start()
            time.sleep(1.0)  # let it settle (the engine's first steps prefill)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(30)


def _engine() -> Any:
    import torch

    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.scheduler import SchedulerConfig

    torch.set_num_threads(1)  # one core for the engine, one for the poller
    scheduler = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512)
    return Engine(EngineConfig(device="cpu", num_kv_blocks=256, scheduler=scheduler))


def _step(engine: Any, stop: threading.Event) -> None:
    """Keep 8 requests of a 64-token prompt and 64 new tokens running until `stop`."""
    from contracts.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    rng = random.Random(0)
    count = 0
    while not stop.is_set():
        while engine.scheduler.num_unfinished < 8:
            prompt = [rng.randrange(20, 40000) for _ in range(64)]
            engine.add_request(f"r{count}", None, params, prompt_token_ids=prompt)
            count += 1
        engine.step()


LOADS = ("idle", "process", "engine", "python")


def measure(samples: int, rounds: int, loads: tuple[str, ...] = LOADS) -> dict[Any, list[float]]:
    """Detection delays per (load, slack mode), the modes interleaved in rounds."""
    results: dict[tuple[str, str], list[float]] = {}
    for load in loads:
        with _Load(load):
            for r in range(rounds):
                for mode in ("default", "fine"):
                    got = delays_us(samples, mode == "fine", seed=r)
                    results.setdefault((load, mode), []).extend(got)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000, help="completions per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loads", default=",".join(LOADS), help=f"of {LOADS}")
    args = parser.parse_args()
    results = measure(args.samples, args.rounds, tuple(args.loads.split(",")))
    print(f"poll interval {nccl._POLL_S * 1e6:.0f} us; {args.rounds} x {args.samples} samples")
    print(f"GIL switch interval {sys.getswitchinterval() * 1e3:.1f} ms")
    print("| beside the poller | timer slack | median delay | p90 | p99 |")
    print("|---|---|---|---|---|")
    for (load, mode), values in results.items():
        values.sort()
        slack = "50 us (default)" if mode == "default" else f"{nccl.POLL_TIMER_SLACK_NS} ns"
        p90, p99 = values[int(0.9 * len(values))], values[int(0.99 * len(values))]
        print(f"| {load} | {slack} | {statistics.median(values):.1f} us | {p90:.1f} us "
              f"| {p99:.1f} us |")  # fmt: skip


if __name__ == "__main__":
    main()

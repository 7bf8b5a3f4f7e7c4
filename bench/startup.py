"""How fast `tandem generate` starts: time to its first output byte, total time and peak
memory of the process, with the converted-model cache cold (first load: parse, dequantize and
store), warm (a repeated load) and off (`--no-cache`), optionally beside another checkout of
Tandem (a baseline commit) run the same way in the same session.

    python -m bench.startup [--repeats 3] [--baseline PATH] [--output startup.json]

Each run is a fresh process, as a user runs it; the model is the bundled default on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "What is the capital of France?"


def run_once(repo: Path, cache_dir: Path, extra: list[str]) -> dict[str, float]:
    """One `tandem generate` in `repo`: seconds to the first byte of output, seconds in all,
    peak resident memory in GB (the child's own, from wait4)."""
    command = [sys.executable, "-m", "cluster.cli", "generate", PROMPT, "--chat",
               "--device", "cpu", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(repo), "TANDEM_CACHE_DIR": str(cache_dir)}
    started = time.monotonic()
    child = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    assert child.stdout is not None
    first = child.stdout.read(1)
    first_byte_s = time.monotonic() - started
    rest = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    total_s = time.monotonic() - started
    if status != 0 or not first:
        raise RuntimeError(f"{command} failed with status {status}: {(first + rest)!r}")
    return {"first_byte_s": first_byte_s, "total_s": total_s, "peak_rss_gb": usage.ru_maxrss / 1e6}


def measure(repo: Path, mode: str, repeats: int) -> list[dict[str, float]]:
    """`repeats` runs: "cold" (an empty cache each), "warm" (a filled one), "off" (--no-cache),
    "as-is" (no flags: a baseline checkout's own load path)."""
    runs = []
    with tempfile.TemporaryDirectory() as warm_dir:
        if mode == "warm":
            run_once(repo, Path(warm_dir), [])  # fills the cache
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as cold_dir:
                cache = Path(warm_dir if mode == "warm" else cold_dir)
                runs.append(run_once(repo, cache, ["--no-cache"] if mode == "off" else []))
    return runs


def summary(runs: list[dict[str, float]], key: str) -> str:
    values = [run[key] for run in runs]
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--baseline", type=Path, default=None, help="another checkout of Tandem, run as it is"
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON results")
    args = parser.parse_args()
    cases = [("this checkout", REPO, mode) for mode in ("cold", "warm", "off")]
    if args.baseline is not None:
        cases.insert(0, (f"baseline {args.baseline.name}", args.baseline.resolve(), "as-is"))
    results = []
    for label, repo, mode in cases:
        runs = measure(repo, mode, args.repeats)
        results.append({"label": label, "mode": mode, "runs": runs})
        print(f"{label:24} {mode:5} first byte {summary(runs, 'first_byte_s')} s, "
              f"total {summary(runs, 'total_s')} s, peak RSS {summary(runs, 'peak_rss_gb')} GB",
              flush=True)  # fmt: skip
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

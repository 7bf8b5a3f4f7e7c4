"""Small helpers shared by the benchmarks: statistics, tables, JSON output, machine description.

Torch is imported lazily so serving benchmarks that never touch a model can use this module too.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Stats:
    """Median, min and max of repeated measurements of one quantity."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            raise ValueError("no values to summarize")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def short(self, digits: int = 1) -> str:
        """`median (min–max)`, or just the value when there was one sample."""
        if self.n == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.min:.{digits}f}–{self.max:.{digits}f})"


def now() -> float:
    """Monotonic seconds, for intervals."""
    return time.perf_counter()


def dummy_prompt_ids(seed: int, length: int = 12) -> list[int]:
    """A prompt of token ids for a dummy model (no tokenizer), the same for the same seed: ids
    in [1, 500), which every named shape's vocabulary holds."""
    rng = random.Random(seed)
    return [rng.randrange(1, 500) for _ in range(length)]


def repeat_interleaved(
    runs: Mapping[str, Callable[[int], T]], repeats: int, warmup: int = 1
) -> dict[str, list[T]]:
    """Call each system's `run(i)` in turn: `warmup` discarded rounds (i < 0), then `repeats`
    kept rounds (i >= 0). Interleaving makes drifts in background load hit every system alike."""
    kept: dict[str, list[T]] = {name: [] for name in runs}
    for i in range(-warmup, repeats):
        for name, run in runs.items():
            result = run(i)
            if i >= 0:
                kept[name].append(result)
    return kept


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(r) for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), separator, *(line(r) for r in rows)])


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Stats):
        return value.as_dict()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_revision() -> str | None:
    """HEAD of the checkout this file lives in, with `-dirty` if there are local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews CPU timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(packages: Sequence[str] = ("torch", "transformers")) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, thread count, versions, date."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": load_average(),
        "git_revision": git_revision(),
        "packages": {name: package_version(name) for name in packages},
    }
    if "torch" in sys.modules:
        import torch

        info["torch_num_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda"] = torch.version.cuda
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info

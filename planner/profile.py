"""A measured profile of one engine on one machine, and step times read from it.

The JSON file `tandem profile` writes and `tandem plan` reads (format below). Loading checks
every field and raises `ProfileError` naming the first one that is wrong. Step times between
measured points are interpolated linearly (bilinearly over a grid), beyond the last point
extrapolated from the last two; torch-free, no I/O beyond reading the file.

    {"version": 2, "model": ..., "device": ..., "block_size": 16, "num_kv_blocks": N,
     "max_num_seqs": 64, "max_num_batched_tokens": 2048, "kv_bytes_per_token": B,
     "prefill": {"tokens": [T...], "context": [C...], "seconds": [[s per C] per T],
                 "samples": [[[s per repeat] per C] per T]},          # samples: optional
     "decode":  {"batch": [B...], "context": [C...], "seconds": [[s per C] per B],
                 "samples": ...},                                     # optional
     "mixed":   {"tokens": [T...], "batch": [0, B...], "context": C,  # optional: steps of a
                 "seconds": [[s per B] per T], "samples": ...},       # chunk beside B decodes
     "overhead": {"step_s": [s...], "request_s": [s...],             # optional: time outside
                  "source": "engine loop" | "service"},               # engine steps (samples)
     "transfer": {"bytes": [N...], "seconds": [s per N]},
     "prefill_decode_ratio": [P, D]}  # optional: the split `tandem plan --save-ratio` found

Version 1 files (no samples, mixed or overhead sections) still load: their steps have no
spread, mixed steps are priced from the prefill and decode grids, and nothing outside engine
steps is timed. What each section means and how the simulator uses it: docs/operations.md,
"Capacity planning".
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

VERSION = 2
READABLE_VERSIONS = (1, 2)
MODELLED_TERMS = ("spread", "mixed", "overhead")  # what version 2 adds (Profile.without)


class ProfileError(ValueError):
    """A profile file that cannot be used: names the file and the field."""


Samples = tuple[tuple[tuple[float, ...], ...], ...]  # [row][column][repeat] seconds


@dataclass(frozen=True, slots=True)
class Grid:
    """Seconds measured over a grid: `seconds[i][j]` (the median) at `rows[i]`, `columns[j]`;
    `samples[i][j]` the repeats it is the median of, when the profile kept them."""

    rows: tuple[int, ...]
    columns: tuple[int, ...]
    seconds: tuple[tuple[float, ...], ...]
    samples: Samples | None = None

    def at(self, row: float, column: float) -> float:
        """Bilinear between the measured points; linear beyond them (never below 0)."""
        values = [_interpolate(self.rows, [s[j] for s in self.seconds], row) for j in
                  range(len(self.columns))]  # fmt: skip
        return max(0.0, _interpolate(self.columns, values, column))

    def spread(self, row: float, column: float) -> tuple[float, ...]:
        """The measured repeats of the point nearest (row, column), each as a ratio to that
        point's median: what a real step varies by around `at()`. (1.0,) without samples."""
        if self.samples is None:
            return NO_SPREAD
        i, j = _nearest(self.rows, row), _nearest(self.columns, column)
        median = self.seconds[i][j]
        return tuple(s / median for s in self.samples[i][j])


NO_SPREAD: tuple[float, ...] = (1.0,)  # a step as its median, every time


def _nearest(points: tuple[int, ...], x: float) -> int:
    return min(range(len(points)), key=lambda i: (abs(points[i] - x), i))


@dataclass(frozen=True, slots=True)
class Curve:
    """Seconds measured at points of one variable."""

    points: tuple[int, ...]
    seconds: tuple[float, ...]

    def at(self, x: float) -> float:
        return max(0.0, _interpolate(self.points, list(self.seconds), x))


def _interpolate(xs: tuple[int, ...], ys: list[float], x: float) -> float:
    """Linear between points; the first value below the first point (fixed costs dominate
    there); beyond the last, the last segment extended."""
    if len(xs) == 1 or x <= xs[0]:
        return ys[0]
    i = min(bisect.bisect_left(xs, x), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True, slots=True)
class Profile:
    """One engine's measured step and transfer times (see the module docstring)."""

    model: str
    device: str
    block_size: int
    num_kv_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_bytes_per_token: int
    prefill: Grid  # rows: chunk tokens, columns: context tokens before the chunk
    decode: Grid  # rows: batch size, columns: context tokens of each sequence
    transfer: Curve  # points: bytes
    machine: str = ""
    prefill_decode_ratio: tuple[int, int] | None = None  # the best split a plan found
    mixed: Mixed | None = None  # measured steps of a prefill chunk beside decodes
    overhead: Overhead | None = None  # measured time outside engine steps

    def step_s(self, prefill_chunks: list[tuple[int, int]], decode_contexts: list[int]) -> float:
        """One engine step's median seconds: prefill chunks (tokens, context before) and
        decodes (context each). A mixed step costs its prefill chunks at their own context plus
        what the decodes add to it: measured (the `mixed` grid: the step beside B decodes
        minus the same chunk alone) when the profile has it, else what the decodes add over
        one decode alone (the fixed per-step cost paid once)."""
        return self.step(prefill_chunks, decode_contexts)[0]

    def step(
        self, prefill_chunks: list[tuple[int, int]], decode_contexts: list[int]
    ) -> tuple[float, tuple[float, ...]]:
        """`step_s` and the measured spread of the point it comes from (ratios to its median:
        the prefill's for a step with a prefill chunk, else the decode's; see Grid.spread)."""
        num_prefill = sum(tokens for tokens, _ in prefill_chunks)
        prefill_s, spread = 0.0, NO_SPREAD
        if num_prefill:
            context = sum(t * c for t, c in prefill_chunks) / num_prefill
            prefill_s = self.prefill.at(num_prefill, context)
            spread = self.prefill.spread(num_prefill, context)
        if not decode_contexts:
            return prefill_s, spread
        batch = len(decode_contexts)
        context = sum(decode_contexts) / batch
        if not num_prefill:
            return self.decode.at(batch, context), self.decode.spread(batch, context)
        if self.mixed is not None:  # measured at mixed.context; longer contexts add as decodes
            longer_s = self.decode.at(batch, context) - self.decode.at(batch, self.mixed.context)
            return prefill_s + max(0.0, self.mixed.added_s(num_prefill, batch) + longer_s), spread
        decode_s = self.decode.at(batch, context)
        return prefill_s + max(0.0, decode_s - self.decode.at(1, context)), spread

    def modelled(self) -> str:
        """What the simulator draws from this profile beyond median steps, in words."""
        spread = "step spread from repeats" if self.prefill.samples or self.decode.samples else (
            "no step spread (no repeats kept)")  # fmt: skip
        mixed = "mixed steps measured" if self.mixed else "mixed steps from prefill + decode"
        overhead = (f"overhead outside steps ({self.overhead.source})" if self.overhead
                    else "no overhead outside steps")  # fmt: skip
        return f"{spread}; {mixed}; {overhead}"

    def without(self, terms: tuple[str, ...]) -> Profile:
        """This profile less some of what version 2 measures (MODELLED_TERMS), to see what
        each term changes in a plan: "spread" (repeats), "mixed", "overhead"."""
        unknown = set(terms) - set(MODELLED_TERMS)
        if unknown:
            raise ValueError(f"unknown terms {sorted(unknown)}: known {MODELLED_TERMS}")
        profile = self
        if "spread" in terms:
            profile = replace(profile, prefill=replace(profile.prefill, samples=None),
                              decode=replace(profile.decode, samples=None))  # fmt: skip
        if "mixed" in terms:
            profile = replace(profile, mixed=None)
        if "overhead" in terms:
            profile = replace(profile, overhead=None)
        return profile

    def transfer_s(self, num_tokens: int) -> float:
        return self.transfer.at(num_tokens * self.kv_bytes_per_token)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": VERSION,
            "model": self.model,
            "device": self.device,
            "machine": self.machine,
            "block_size": self.block_size,
            "num_kv_blocks": self.num_kv_blocks,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "prefill": _grid_json(self.prefill, "tokens"),
            "decode": _grid_json(self.decode, "batch"),
            "transfer": {
                "bytes": list(self.transfer.points),
                "seconds": list(self.transfer.seconds),
            },
        }
        if self.mixed is not None:
            grid = self.mixed.grid
            data["mixed"] = {"tokens": list(grid.rows), "batch": list(grid.columns),
                             "context": self.mixed.context, **_times_json(grid)}  # fmt: skip
        if self.overhead is not None:
            data["overhead"] = {"source": self.overhead.source,
                                "step_s": list(self.overhead.step_s),
                                "request_s": list(self.overhead.request_s)}  # fmt: skip
        if self.prefill_decode_ratio is not None:
            data["prefill_decode_ratio"] = list(self.prefill_decode_ratio)
        return data

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path


def _grid_json(grid: Grid, rows: str) -> dict[str, Any]:
    return {rows: list(grid.rows), "context": list(grid.columns), **_times_json(grid)}


def _times_json(grid: Grid) -> dict[str, Any]:
    data: dict[str, Any] = {"seconds": [list(r) for r in grid.seconds]}
    if grid.samples is not None:
        data["samples"] = [[list(point) for point in row] for row in grid.samples]
    return data


def load_profile(path: str | Path) -> Profile:
    """Read and check a profile file. Raises ProfileError naming the file and what is wrong
    (unreadable, not JSON, a missing or mistyped field, a grid of the wrong shape, axes not
    ascending, times not positive)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ProfileError(f"profile {path}: cannot read it: {e}") from None
    except json.JSONDecodeError as e:
        raise ProfileError(f"profile {path}: not JSON: {e}") from None
    try:
        return profile_of(data)
    except ProfileError as e:
        raise ProfileError(f"profile {path}: {e}") from None


def profile_of(data: Any) -> Profile:
    """A Profile from parsed JSON; raises ProfileError naming the wrong field."""
    if not isinstance(data, dict):
        raise ProfileError(f"expected a JSON object, got {type(data).__name__}")
    version = data.get("version")
    if version not in READABLE_VERSIONS:
        raise ProfileError(f"version={version!r}: this planner reads versions "
                           f"{', '.join(map(str, READABLE_VERSIONS))}")  # fmt: skip
    if version == 1:  # nothing of version 2's may hide in it
        extra = sorted({"mixed", "overhead"} & data.keys())
        if extra:
            raise ProfileError(f"version=1 with {extra}: those sections are version 2's")
    ints = {name: _positive_int(data, name) for name in (
        "block_size", "num_kv_blocks", "max_num_seqs", "max_num_batched_tokens",
        "kv_bytes_per_token")}  # fmt: skip
    return Profile(
        model=_string(data, "model"),
        device=_string(data, "device"),
        machine=str(data.get("machine", "")),
        prefill=_grid(data, "prefill", "tokens"),
        decode=_grid(data, "decode", "batch"),
        transfer=_curve(data, "transfer"),
        prefill_decode_ratio=_ratio(data.get("prefill_decode_ratio")),
        mixed=_mixed(data),
        overhead=_overhead(data),
        **ints,
    )


def _ratio(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or any(type(v) is not int or v < 1 for v in value)):  # fmt: skip
        raise ProfileError(f"prefill_decode_ratio={value!r} must be [prefill, decode], ints >= 1")
    return value[0], value[1]


def save_ratio(path: str | Path, ratio: tuple[int, int]) -> None:
    """Write `ratio` into the profile at `path` (checked first: ProfileError if it is bad)."""
    replace(load_profile(path), prefill_decode_ratio=_ratio(list(ratio))).save(path)


def _string(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise ProfileError(f"{name}={value!r} must be a non-empty string")
    return value


def _positive_int(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if type(value) is not int or value < 1:
        raise ProfileError(f"{name}={value!r} must be an int >= 1")
    return value


def _axis(value: Any, name: str, minimum: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ProfileError(f"{name}={value!r} must be a non-empty list of ints")
    if any(type(v) is not int or v < minimum for v in value):
        raise ProfileError(f"{name}={value!r} must hold ints >= {minimum}")
    if any(b <= a for a, b in itertools.pairwise(value)):
        raise ProfileError(f"{name}={value!r} must be strictly ascending")
    return tuple(value)


def _seconds(value: Any, name: str, length: int) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != length:
        raise ProfileError(f"{name} must be a list of {length} times, got {value!r}")
    for v in value:
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not (v > 0 and math.isfinite(v))
        ):
            raise ProfileError(f"{name} holds {v!r}: times must be positive seconds")
    return tuple(float(v) for v in value)


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    section = data.get(name)
    if not isinstance(section, dict):
        raise ProfileError(f"{name} must be an object, got {section!r}")
    return section


def _grid(data: dict[str, Any], name: str, rows_name: str) -> Grid:
    section = _section(data, name)
    rows = _axis(section.get(rows_name), f"{name}.{rows_name}", 1)
    columns = _axis(section.get("context"), f"{name}.context", 0)
    return _grid_of(section, name, rows_name, rows, columns, data.get("version") != 1)


def _grid_of(
    section: dict[str, Any],
    name: str,
    rows_name: str,
    rows: tuple[int, ...],
    columns: tuple[int, ...],
    may_sample: bool,
) -> Grid:
    seconds = section.get("seconds")
    if not isinstance(seconds, list) or len(seconds) != len(rows):
        raise ProfileError(f"{name}.seconds must hold one list per {rows_name} ({len(rows)})")
    table = tuple(
        _seconds(row, f"{name}.seconds[{i}]", len(columns)) for i, row in enumerate(seconds)
    )
    if "samples" not in section:
        return Grid(rows, columns, table)
    if not may_sample:
        raise ProfileError(f"{name}.samples: version 1 profiles hold no samples")
    samples = section["samples"]
    if not isinstance(samples, list) or len(samples) != len(rows):
        raise ProfileError(f"{name}.samples must hold one list per {rows_name} ({len(rows)})")
    points = []
    for i, row in enumerate(samples):
        if not isinstance(row, list) or len(row) != len(columns):
            raise ProfileError(f"{name}.samples[{i}] must hold one list per column "
                               f"({len(columns)})")  # fmt: skip
        points.append(tuple(_repeats(p, f"{name}.samples[{i}][{j}]") for j, p in enumerate(row)))
        for j, point in enumerate(points[-1]):
            if not math.isclose(statistics.median(point), table[i][j], rel_tol=1e-9):
                raise ProfileError(f"{name}.samples[{i}][{j}]: their median "
                                   f"{statistics.median(point)!r} is not {name}.seconds[{i}][{j}]"
                                   f" {table[i][j]!r}")  # fmt: skip
    return Grid(rows, columns, table, tuple(points))


def _repeats(value: Any, name: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ProfileError(f"{name} must be a non-empty list of times, got {value!r}")
    return _seconds(value, name, len(value))


@dataclass(frozen=True, slots=True)
class Mixed:
    """Steps of one prefill chunk of `rows` tokens (no context before it) beside `columns`
    decodes of `context` tokens each; column 0 is the chunk alone, measured in the same run."""

    grid: Grid  # rows: chunk tokens, columns: decodes beside it (the first is 0)
    context: int

    def added_s(self, num_prefill: int, batch: int) -> float:
        """What `batch` decodes add to a step of `num_prefill` prefill tokens (never < 0)."""
        return max(0.0, self.grid.at(num_prefill, batch) - self.grid.at(num_prefill, 0))


def _mixed(data: dict[str, Any]) -> Mixed | None:
    if "mixed" not in data:
        return None
    section = _section(data, "mixed")
    rows = _axis(section.get("tokens"), "mixed.tokens", 1)
    columns = _axis(section.get("batch"), "mixed.batch", 0)
    if columns[0] != 0 or len(columns) < 2:
        raise ProfileError(f"mixed.batch={list(columns)} must start at 0 (the chunk alone) "
                           "and hold a batch beside it")  # fmt: skip
    context = section.get("context")
    if type(context) is not int or context < 1:
        raise ProfileError(f"mixed.context={context!r} must be an int >= 1")
    return Mixed(_grid_of(section, "mixed", "tokens", rows, columns, True), context)


OVERHEAD_SOURCES = ("engine loop", "service")


@dataclass(frozen=True, slots=True)
class Overhead:
    """Measured time outside engine steps (samples, seconds). `step_s`: what the real engine
    loop spends per step beside `Engine.step` (its inbox, its role's turn, handing outputs
    over). `request_s`: a request's time from its sender to the engine and its first output
    back, beyond the engine's steps (`source` says through what: the engine loop alone, or a
    whole service: router, Ray, gRPC)."""

    step_s: tuple[float, ...]
    request_s: tuple[float, ...]
    source: str

    def describe(self) -> str:
        def ms(samples: tuple[float, ...]) -> str:
            ordered = sorted(samples)
            p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
            return f"median {1000 * ordered[len(ordered) // 2]:.2f} ms, p99 {1000 * p99:.2f} ms"

        steps, requests = self.step_s, self.request_s
        return (f"per step {ms(steps)} ({len(steps)} steps); per request {ms(requests)} "
                f"({len(requests)} requests), {self.source}")  # fmt: skip


def _overhead(data: dict[str, Any]) -> Overhead | None:
    if "overhead" not in data:
        return None
    section = _section(data, "overhead")
    source = section.get("source")
    if source not in OVERHEAD_SOURCES:
        raise ProfileError(f"overhead.source={source!r} must be one of {OVERHEAD_SOURCES}")
    samples = {}
    for name in ("step_s", "request_s"):
        value = section.get(name)
        if not isinstance(value, list) or not value:
            raise ProfileError(f"overhead.{name}={value!r} must be a non-empty list of seconds")
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    v >= 0 and math.isfinite(v)):  # fmt: skip
                raise ProfileError(f"overhead.{name} holds {v!r}: times must be seconds >= 0")
        samples[name] = tuple(float(v) for v in value)
    return Overhead(samples["step_s"], samples["request_s"], source)


def _curve(data: dict[str, Any], name: str) -> Curve:
    section = _section(data, name)
    points = _axis(section.get("bytes"), f"{name}.bytes", 1)
    return Curve(points, _seconds(section.get("seconds"), f"{name}.seconds", len(points)))

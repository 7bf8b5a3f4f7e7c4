"""A measured profile of one engine on one machine, and step times read from it.

The JSON file `tandem profile` writes and `tandem plan` reads (format below). Loading checks
every field and raises `ProfileError` naming the first one that is wrong. Step times between
measured points are interpolated linearly (bilinearly over a grid), beyond the last point
extrapolated from the last two; torch-free, no I/O beyond reading the file.

    {"version": 1, "model": ..., "device": ..., "block_size": 16, "num_kv_blocks": N,
     "max_num_seqs": 64, "max_num_batched_tokens": 2048, "kv_bytes_per_token": B,
     "prefill": {"tokens": [T...], "context": [C...], "seconds": [[s per C] per T]},
     "decode":  {"batch": [B...], "context": [C...], "seconds": [[s per C] per B]},
     "transfer": {"bytes": [N...], "seconds": [s per N]},
     "prefill_decode_ratio": [P, D]}  # optional: the split `tandem plan --save-ratio` found
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

VERSION = 1


class ProfileError(ValueError):
    """A profile file that cannot be used: names the file and the field."""


@dataclass(frozen=True, slots=True)
class Grid:
    """Seconds measured over a grid: `seconds[i][j]` at `rows[i]`, `columns[j]`."""

    rows: tuple[int, ...]
    columns: tuple[int, ...]
    seconds: tuple[tuple[float, ...], ...]

    def at(self, row: float, column: float) -> float:
        """Bilinear between the measured points; linear beyond them (never below 0)."""
        values = [_interpolate(self.rows, [s[j] for s in self.seconds], row) for j in
                  range(len(self.columns))]  # fmt: skip
        return max(0.0, _interpolate(self.columns, values, column))


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

    def step_s(self, prefill_chunks: list[tuple[int, int]], decode_contexts: list[int]) -> float:
        """One engine step: prefill chunks (tokens, context before) and decodes (context each).
        A mixed step costs its prefill chunks at their own context plus what the decodes add
        over one decode alone (the fixed per-step cost is paid once)."""
        num_prefill = sum(tokens for tokens, _ in prefill_chunks)
        prefill_s = 0.0
        if num_prefill:
            context = sum(t * c for t, c in prefill_chunks) / num_prefill
            prefill_s = self.prefill.at(num_prefill, context)
        if not decode_contexts:
            return prefill_s
        context = sum(decode_contexts) / len(decode_contexts)
        decode_s = self.decode.at(len(decode_contexts), context)
        if not num_prefill:
            return decode_s
        return prefill_s + max(0.0, decode_s - self.decode.at(1, context))

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
        if self.prefill_decode_ratio is not None:
            data["prefill_decode_ratio"] = list(self.prefill_decode_ratio)
        return data

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path


def _grid_json(grid: Grid, rows: str) -> dict[str, Any]:
    return {rows: list(grid.rows), "context": list(grid.columns),
            "seconds": [list(r) for r in grid.seconds]}  # fmt: skip


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
    if data.get("version") != VERSION:
        raise ProfileError(f"version={data.get('version')!r}: this planner reads version {VERSION}")
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
    seconds = section.get("seconds")
    if not isinstance(seconds, list) or len(seconds) != len(rows):
        raise ProfileError(f"{name}.seconds must hold one list per {rows_name} ({len(rows)})")
    table = tuple(
        _seconds(row, f"{name}.seconds[{i}]", len(columns)) for i, row in enumerate(seconds)
    )
    return Grid(rows, columns, table)


def _curve(data: dict[str, Any], name: str) -> Curve:
    section = _section(data, name)
    points = _axis(section.get("bytes"), f"{name}.bytes", 1)
    return Curve(points, _seconds(section.get("seconds"), f"{name}.seconds", len(points)))

"""Service-level objectives: `ttft=500ms,tpot=30ms` parsed into an Slo, and whether one request
met them. Parsing only; the goodput arithmetic lives in `metrics`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SLO_NAMES = {"ttft": "ttft_s", "tpot": "tpot_s", "e2e": "e2e_s", "e2el": "e2e_s"}
_UNITS_S = {"ms": 1e-3, "s": 1.0}
_ITEM = re.compile(
    r"^\s*([A-Za-z0-9_]+)\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-z]*)\s*$"
)


@dataclass(frozen=True, slots=True)
class Slo:
    """Upper bounds on one request's latencies, in seconds; None: not constrained."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s", "e2e_s"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"Slo.{name} must be a positive number of seconds, got {value}")

    @property
    def is_empty(self) -> bool:
        return self.ttft_s is None and self.tpot_s is None and self.e2e_s is None

    def describe(self) -> str:
        """The SLO as the CLI takes it, in milliseconds: `ttft=500ms,tpot=30ms`."""
        parts = [
            f"{label}={1000 * value:g}ms"
            for label, value in (("ttft", self.ttft_s), ("tpot", self.tpot_s), ("e2e", self.e2e_s))
            if value is not None
        ]
        return ",".join(parts)


def parse_slo(spec: str) -> Slo:
    """`ttft=500ms,tpot=30ms,e2e=2s` -> Slo. Raises ValueError saying which item is wrong and
    what is accepted (names ttft, tpot, e2e; units ms or s; positive values; no repeats)."""
    values: dict[str, float] = {}
    items = [item for item in spec.split(",") if item.strip()]
    if not items:
        raise ValueError(f"SLO {spec!r} is empty: give e.g. ttft=500ms,tpot=30ms")
    for item in items:
        match = _ITEM.match(item)
        if match is None:
            raise ValueError(f"SLO item {item.strip()!r} is not NAME=VALUEUNIT, e.g. ttft=500ms")
        name, number, unit = match.group(1).lower(), float(match.group(2)), match.group(3)
        if name not in SLO_NAMES:
            raise ValueError(
                f"SLO item {item.strip()!r}: unknown metric {name!r} (use ttft, tpot or e2e)"
            )
        if unit not in _UNITS_S:
            raise ValueError(
                f"SLO item {item.strip()!r}: "
                + (f"unknown unit {unit!r}" if unit else "no unit")
                + " (use ms or s)"
            )
        field = SLO_NAMES[name]
        if field in values:
            raise ValueError(f"SLO item {item.strip()!r}: {name} is given twice")
        if number <= 0:
            raise ValueError(f"SLO item {item.strip()!r}: the bound must be positive")
        values[field] = number * _UNITS_S[unit]
    return Slo(**values)

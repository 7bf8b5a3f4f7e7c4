"""When each session of a run is sent: Poisson arrivals at a rate, or gamma arrivals with a
burstiness factor (the shape of the gamma; 1 is Poisson, below 1 burstier, above 1 steadier),
always with the mean rate asked for. A cap on requests in flight is the runner's business, not
this module's. Pure: the same seed gives the same schedule."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ArrivalConfig:
    """`request_rate` in sessions per second (inf: all at once); `burstiness` > 0."""

    request_rate: float = math.inf
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be positive, got {self.request_rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a positive number, got {self.burstiness}")


def arrival_offsets_s(num_arrivals: int, config: ArrivalConfig, seed: int) -> list[float]:
    """Send times in seconds after the run starts, ascending; the first is 0. The gaps are
    gamma(shape=burstiness, scale=1 / (rate * burstiness)): mean 1 / rate, and exponential
    (a Poisson process) when burstiness is 1."""
    if num_arrivals < 0:
        raise ValueError(f"num_arrivals must be >= 0, got {num_arrivals}")
    if math.isinf(config.request_rate):
        return [0.0] * num_arrivals
    rng = random.Random(seed)
    scale = 1.0 / (config.request_rate * config.burstiness)
    offsets: list[float] = []
    now = 0.0
    for index in range(num_arrivals):
        if index:
            now += rng.gammavariate(config.burstiness, scale)
        offsets.append(now)
    return offsets

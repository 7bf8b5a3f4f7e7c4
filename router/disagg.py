"""Where a disaggregated request is prefilled: on the prefill pool, its KV shipped to the decode
worker (`remote`), or on the chosen decode worker itself (`local`, as colocated mode does).

`DisaggPolicy.decide` is pure: it reads the request's uncached prompt tokens, the prefill
pool's queue, the decode worker's load and recent inter-token latency, and returns the path and
a reason from a small fixed set (a span attribute and the label of
`tandem_prefill_placement_total`). Why each rule: docs/operations.md, "Placement".
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("always", "never", "auto")  # always: remote; never: local; auto: decide per request
REMOTE, LOCAL = "remote", "local"
# Every reason decide() gives, with the path it goes with: the metric's label values.
REASONS = {
    "forced_remote": REMOTE,  # --disagg always
    "forced_local": LOCAL,  # --disagg never
    "no_prefill_worker": LOCAL,  # auto: no placeable prefill worker left
    "decode_busy": REMOTE,  # auto: the decode worker's load is at the threshold
    "decode_itl": REMOTE,  # auto: its streams' recent ITL is at the target already
    "short_prompt": LOCAL,  # auto: few uncached tokens: not worth a transfer
    "prefill_queue": LOCAL,  # auto: the prefill pool's queue is long
    "long_prompt": REMOTE,  # auto: otherwise
}


@dataclass(frozen=True, slots=True)
class DecodeState:
    """The decode worker as the router sees it when deciding."""

    load: float  # running sequences / max + KV fraction in use (router.placement.WorkerLoad)
    num_requests: int  # the router's requests on it now
    recent_itl_s: float | None  # its streams' recent inter-token latency; None: not measured


@dataclass(frozen=True, slots=True)
class DisaggPolicy:
    """The per-request prefill placement of disaggregated mode.

    auto, in order: no placeable prefill worker -> local; decode worker's load >=
    `decode_max_load` -> remote; its recent ITL >= `target_itl_s` while it streams -> remote;
    uncached prompt tokens <= `local_max_tokens` -> local; the prefill pool's shortest queue >=
    `prefill_queue_tokens` -> local; else remote."""

    mode: str = "always"
    local_max_tokens: int = 256
    prefill_queue_tokens: int = 8192
    decode_max_load: float = 1.0
    target_itl_s: float | None = None  # the ITL the decode worker protects; None: not checked

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}")
        for name in ("local_max_tokens", "prefill_queue_tokens"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"{name}={value!r} must be an int >= 0")
        if not (isinstance(self.decode_max_load, (int, float)) and self.decode_max_load > 0):
            raise ValueError(f"decode_max_load={self.decode_max_load!r} must be > 0")
        if self.target_itl_s is not None and not (
            isinstance(self.target_itl_s, (int, float)) and self.target_itl_s > 0
        ):
            raise ValueError(f"target_itl_s={self.target_itl_s!r} must be > 0 seconds or None")

    def decide(
        self, uncached_tokens: int, prefill_queue_tokens: int | None, decode: DecodeState
    ) -> tuple[str, str]:
        """(path, reason) for one request. `uncached_tokens`: the prompt tokens the decode
        worker would compute; `prefill_queue_tokens`: the shortest queue of a placeable prefill
        worker (None: none is placeable)."""
        if self.mode == "always":
            return REMOTE, "forced_remote"
        if self.mode == "never":
            return LOCAL, "forced_local"
        if prefill_queue_tokens is None:
            return LOCAL, "no_prefill_worker"
        if decode.load >= self.decode_max_load:
            return REMOTE, "decode_busy"
        if (
            self.target_itl_s is not None
            and decode.num_requests > 0
            and decode.recent_itl_s is not None
            and decode.recent_itl_s >= self.target_itl_s
        ):
            return REMOTE, "decode_itl"
        if uncached_tokens <= self.local_max_tokens:
            return LOCAL, "short_prompt"
        if prefill_queue_tokens >= self.prefill_queue_tokens:
            return LOCAL, "prefill_queue"
        return REMOTE, "long_prompt"

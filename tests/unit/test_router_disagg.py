"""Per-request prefill placement (router.disagg): each input pushes the decision the right way,
thresholds hold at their edges, forced modes ignore the inputs, bad thresholds are refused by
name; the router measures a decode worker's recent ITL from its streams' gaps."""

from __future__ import annotations

import pytest

from router.disagg import LOCAL, REASONS, REMOTE, DecodeState, DisaggPolicy
from router.placement import ITL_SMOOTHING, WorkerLoad

AUTO = DisaggPolicy(
    mode="auto", local_max_tokens=256, prefill_queue_tokens=8192, decode_max_load=1.0,
    target_itl_s=0.05,
)  # fmt: skip
IDLE = DecodeState(load=0.0, num_requests=0, recent_itl_s=None)
STREAMING = DecodeState(load=0.3, num_requests=4, recent_itl_s=0.02)  # under the 50 ms target


def test_a_short_uncached_prompt_is_prefilled_on_its_decode_worker() -> None:
    assert AUTO.decide(20, 0, IDLE) == (LOCAL, "short_prompt")
    assert AUTO.decide(20, 0, STREAMING) == (LOCAL, "short_prompt")


def test_a_long_prompt_goes_to_the_prefill_pool() -> None:
    assert AUTO.decide(3000, 0, IDLE) == (REMOTE, "long_prompt")
    assert AUTO.decide(3000, 8191, STREAMING) == (REMOTE, "long_prompt")


def test_a_long_prefill_queue_keeps_even_a_long_prompt_local() -> None:
    assert AUTO.decide(3000, 8192, IDLE) == (LOCAL, "prefill_queue")
    assert AUTO.decide(3000, 50_000, STREAMING) == (LOCAL, "prefill_queue")


def test_no_placeable_prefill_worker_means_local() -> None:
    assert AUTO.decide(3000, None, STREAMING) == (LOCAL, "no_prefill_worker")
    busy = DecodeState(load=1.5, num_requests=9, recent_itl_s=1.0)
    assert AUTO.decide(3000, None, busy) == (LOCAL, "no_prefill_worker")  # nowhere else


def test_a_busy_decode_worker_sends_even_a_short_prompt_remote() -> None:
    for load in (1.0, 1.7):
        busy = DecodeState(load=load, num_requests=8, recent_itl_s=0.01)
        assert AUTO.decide(20, 0, busy) == (REMOTE, "decode_busy")
        assert AUTO.decide(3000, 50_000, busy) == (REMOTE, "decode_busy")  # queue or not
    just_under = DecodeState(load=0.999, num_requests=8, recent_itl_s=0.01)
    assert AUTO.decide(20, 0, just_under) == (LOCAL, "short_prompt")


def test_a_decode_worker_at_its_itl_target_prefills_nothing() -> None:
    at_target = DecodeState(load=0.3, num_requests=4, recent_itl_s=0.05)
    assert AUTO.decide(20, 0, at_target) == (REMOTE, "decode_itl")
    assert AUTO.decide(3000, 50_000, at_target) == (REMOTE, "decode_itl")
    under = DecodeState(load=0.3, num_requests=4, recent_itl_s=0.0499)
    assert AUTO.decide(20, 0, under) == (LOCAL, "short_prompt")
    # nothing streams there now: an old ITL protects nobody
    idle = DecodeState(load=0.0, num_requests=0, recent_itl_s=0.2)
    assert AUTO.decide(20, 0, idle) == (LOCAL, "short_prompt")
    # no target: ITL is not checked
    untargeted = DisaggPolicy(mode="auto", target_itl_s=None)
    assert untargeted.decide(20, 0, at_target) == (LOCAL, "short_prompt")


def test_the_short_prompt_threshold_is_inclusive() -> None:
    assert AUTO.decide(256, 0, IDLE) == (LOCAL, "short_prompt")
    assert AUTO.decide(257, 0, IDLE) == (REMOTE, "long_prompt")
    never_short = DisaggPolicy(mode="auto", local_max_tokens=0)
    assert never_short.decide(1, 0, IDLE) == (REMOTE, "long_prompt")


def test_forced_modes_ignore_every_input() -> None:
    always, never = DisaggPolicy(mode="always"), DisaggPolicy(mode="never")
    busy = DecodeState(load=2.0, num_requests=99, recent_itl_s=9.0)
    for args in [(1, 0, IDLE), (5000, 10**6, IDLE), (1, 0, busy), (1, None, IDLE)]:
        assert always.decide(*args) == (REMOTE, "forced_remote")
        assert never.decide(*args) == (LOCAL, "forced_local")


def test_every_reason_matches_its_path_and_the_default_is_todays_path() -> None:
    cases = [
        (AUTO.decide(20, 0, IDLE)),
        (AUTO.decide(3000, 0, IDLE)),
        (AUTO.decide(3000, 9000, IDLE)),
        (AUTO.decide(3000, None, IDLE)),
        (AUTO.decide(20, 0, DecodeState(1.0, 1, None))),
        (AUTO.decide(20, 0, DecodeState(0.1, 1, 0.06))),
        (DisaggPolicy(mode="always").decide(1, 0, IDLE)),
        (DisaggPolicy(mode="never").decide(1, 0, IDLE)),
    ]
    assert {reason for _, reason in cases} == set(REASONS)
    for path, reason in cases:
        assert REASONS[reason] == path
    assert DisaggPolicy().mode == "always"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "sometimes"}, "mode='sometimes' must be one of"),
        ({"local_max_tokens": -1}, "local_max_tokens=-1 must be an int >= 0"),
        ({"local_max_tokens": 2.5}, "local_max_tokens=2.5 must be an int >= 0"),
        ({"prefill_queue_tokens": -5}, "prefill_queue_tokens=-5 must be an int >= 0"),
        ({"decode_max_load": 0}, "decode_max_load=0 must be > 0"),
        ({"decode_max_load": float("nan")}, "decode_max_load=nan must be > 0"),
        ({"target_itl_s": 0.0}, "target_itl_s=0.0 must be > 0 seconds or None"),
    ],
)
def test_bad_thresholds_are_refused_by_name(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DisaggPolicy(**fields)  # type: ignore[arg-type]


def test_recent_itl_follows_a_workers_gaps() -> None:
    load = WorkerLoad()
    assert load.recent_itl_s is None
    load.observe_itl(0.1)
    assert load.recent_itl_s == pytest.approx(0.1)
    for _ in range(ITL_SMOOTHING * 8):
        load.observe_itl(0.01)
    assert load.recent_itl_s == pytest.approx(0.01, abs=1e-4)

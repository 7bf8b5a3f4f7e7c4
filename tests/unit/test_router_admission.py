"""Admission control counts requests and prompt tokens in flight and refuses past either."""

from __future__ import annotations

import pytest

from contracts.errors import Overloaded
from router.admission import Admission, AdmissionLimits


def test_requests_and_tokens_are_bounded_and_given_back() -> None:
    admission = Admission(AdmissionLimits(max_requests=2, max_prompt_tokens=100))
    with admission.admit(60):
        refused = pytest.raises(Overloaded, match=r"60 prompt tokens in flight, this request 41")
        with refused, admission.admit(41):
            pass
        with admission.admit(40):
            assert (admission.requests, admission.prompt_tokens) == (2, 100)
            full = pytest.raises(Overloaded, match=r"2 requests in flight \(limit 2\)")
            with full, admission.admit(0):
                pass
    assert (admission.requests, admission.prompt_tokens, admission.refused) == (0, 0, 2)


def test_the_prompt_token_bound_follows_the_kv_capacity_unless_given() -> None:
    """Issue 22.4: by default the bound is the decode pool's KV capacity, read at each
    admission (it changes as workers report and the pool scales); until known, a constant."""
    capacity = [0]
    admission = Admission(AdmissionLimits(), kv_capacity_tokens=lambda: capacity[0])
    with admission.admit(5000):  # not known yet: the default bound
        pass
    capacity[0] = 100
    with admission.admit(60):
        refused = pytest.raises(Overloaded, match=r"limit 100: the decode pool's KV capacity")
        with refused, admission.admit(41):
            pass
        capacity[0] = 200  # a worker joined
        with admission.admit(41):
            assert admission.prompt_tokens == 101
    given = Admission(AdmissionLimits(max_prompt_tokens=10), kv_capacity_tokens=lambda: 100)
    with pytest.raises(Overloaded, match=r"limit 10\)"), given.admit(11):
        pass


def test_a_failing_request_gives_its_place_back() -> None:
    admission = Admission(AdmissionLimits(max_requests=1))
    with pytest.raises(RuntimeError), admission.admit(5):
        raise RuntimeError("worker failed")
    with admission.admit(5):
        assert admission.requests == 1


@pytest.mark.parametrize("kwargs", [{"max_requests": 0}, {"max_prompt_tokens": -1}])
def test_limits_refuse_nonsense(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="must be an int >= 1"):
        AdmissionLimits(**kwargs)


def test_request_bytes_are_bounded_before_tokens_are_known() -> None:
    """Admission sees a request's size (its serialized bytes) as it arrives, then its prompt
    tokens once tokenized; both are given back."""
    admission = Admission(AdmissionLimits(max_prompt_tokens=100, max_request_bytes=1000))
    with admission.admit(request_bytes=900) as ticket:
        too_big = pytest.raises(Overloaded, match=r"900 request bytes in flight, this request 101")
        with too_big, admission.admit(request_bytes=101):
            pass
        ticket.add_prompt_tokens(80)
        with admission.admit(request_bytes=100) as other:
            with pytest.raises(Overloaded, match=r"80 prompt tokens in flight, this request 21"):
                other.add_prompt_tokens(21)
            other.add_prompt_tokens(20)
            assert (admission.requests, admission.prompt_tokens) == (2, 100)
    assert (admission.requests, admission.prompt_tokens, admission.request_bytes) == (0, 0, 0)
    assert admission.refused == 2

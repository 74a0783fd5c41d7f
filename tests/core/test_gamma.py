import pytest

from services.core.errors import InvalidRequest
from services.core.gamma import GammaSchedule, LoadAwareGamma


def test_fixed_schedule_never_moves():
    assert GammaSchedule(4).next(4, drafted=4, accepted=4) == 4
    assert GammaSchedule(4).next(4, drafted=4, accepted=0) == 4


def test_heuristic_schedule_plus_two_minus_one_within_bounds():
    s = GammaSchedule(4, adaptive=True, minimum=1, maximum=8)
    assert s.next(4, drafted=4, accepted=4) == 6
    assert s.next(7, drafted=7, accepted=7) == 8
    assert s.next(4, drafted=4, accepted=2) == 3
    assert s.next(1, drafted=1, accepted=0) == 1
    assert s.next(5, drafted=0, accepted=0) == 5  # nothing drafted: no evidence either way


def test_bad_gamma_is_rejected():
    with pytest.raises(InvalidRequest, match="gamma"):
        GammaSchedule(initial=-1)
    with pytest.raises(InvalidRequest, match="gamma"):
        GammaSchedule(initial=17)


def test_load_aware_gamma_does_not_limit_before_it_has_measured():
    policy = LoadAwareGamma(maximum=8)
    assert policy.cap(8) == 8
    policy.observe_pass(9, 0.04)  # one pass size: no slope yet
    policy.observe_round(8, 6, 0.0)
    assert policy.cap(8) == 8


def test_load_aware_gamma_shrinks_drafts_as_passes_turn_compute_bound():
    policy = LoadAwareGamma(maximum=8)
    # A pass costs 20 ms plus 2 ms per position; drafts are accepted 80% of the time.
    for n in (1, 5, 9, 40, 72):
        policy.observe_pass(n, 0.020 + 0.002 * n)
    policy.observe_round(100, 80, 0.0)
    assert policy.fit() == pytest.approx((0.020, 0.002))
    caps = [policy.cap(b) for b in (1, 2, 4, 8, 16)]
    assert caps == sorted(caps, reverse=True) and caps[0] > caps[-1]
    # The choice is the argmax of the modelled goodput, checked by brute force.
    expected = lambda g, b: b * (1 - 0.8 ** (g + 1)) / 0.2 / (0.020 + 0.002 * b * (g + 1))  # noqa: E731
    assert caps[-1] == max(range(9), key=lambda g: expected(g, 16))
    # Drafts nobody accepts are never worth verifying.
    useless = LoadAwareGamma(maximum=8)
    for n in (1, 9):
        useless.observe_pass(n, 0.020 + 0.002 * n)
    useless.observe_round(100, 0, 0.0)
    assert useless.cap(8) == 0


def test_load_aware_gamma_keeps_long_drafts_while_passes_are_memory_bound():
    policy = LoadAwareGamma(maximum=8)
    for n in (1, 9, 72):
        policy.observe_pass(n, 0.020)  # a pass costs the same whatever its size
    policy.observe_round(100, 80, 0.0)
    assert policy.cap(8) == 8

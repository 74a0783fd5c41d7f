import pytest

from services.core.errors import InvalidRequest
from services.core.gamma import GammaSchedule


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

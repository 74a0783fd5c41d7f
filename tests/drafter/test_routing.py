"""Draft-worker routing by reported load (drafter/routing.py)."""

from services.drafter.routing import rank_by_load


def stats(sessions, step_s=0.01, capacity=32, queued=0):
    return {"sessions": sessions, "step_s": step_s, "capacity": capacity, "queued_steps": queued}


def test_the_least_loaded_worker_comes_first():
    assert rank_by_load([stats(5), stats(1), stats(3)], [0, 0, 0]) == [1, 2, 0]


def test_sessions_sent_since_a_report_count_so_a_burst_spreads():
    # Both reported 2 sessions; this router has since sent 3 to the first.
    assert rank_by_load([stats(2), stats(2)], [3, 0])[0] == 1
    # A burst of sessions, each counted as it is routed, alternates between equal workers.
    routed = [0, 0]
    for _ in range(8):
        routed[rank_by_load([stats(0), stats(0)], routed)[0]] += 1
    assert routed == [4, 4]


def test_sessions_weigh_by_capacity_and_step_times_break_ties():
    # A worker twice the size takes twice the sessions before it counts as busier.
    assert rank_by_load([stats(6, capacity=16), stats(10, capacity=32)], [0, 0]) == [1, 0]
    # Equal sessions: fewer queued steps, then faster steps, first.
    assert rank_by_load([stats(4, queued=3), stats(4, queued=0)], [0, 0]) == [1, 0]
    assert rank_by_load([stats(4, step_s=0.010), stats(4, step_s=0.004)], [0, 0]) == [1, 0]


def test_a_full_worker_comes_last_and_a_new_one_counts_as_empty():
    assert rank_by_load([stats(32, capacity=32), stats(40, capacity=64)], [0, 0]) == [1, 0]
    new = {}  # no report yet
    assert rank_by_load([stats(3), new], [0, 0]) == [1, 0]


def test_ties_break_at_random():
    firsts = {rank_by_load([stats(1), stats(1), stats(1)], [0, 0, 0])[0] for _ in range(200)}
    assert firsts == {0, 1, 2}

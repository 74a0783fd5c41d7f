"""The goodput controller: the plan is the argmax of the modelled goodput, each
session's gamma follows its own acceptance, and a stopped session is re-probed."""

import itertools

import numpy as np
import pytest

from services.core.arm_check import CHECK_BELOW, CHECK_EVERY, CHECK_PASSES
from services.core.goodput import (AGE_ROUNDS, LATE_WEIGHT, PROBE_EVERY, PROBE_GAMMA, REPLAN_SESSIONS,
                                   GoodputController, PassCost, expected_tokens)


def passes(controller, a, b, sizes=(2, 9, 17, 40, 72), each=4):
    for n in sizes:
        for _ in range(each):
            controller.observe_pass(n, a + b * n, committed=1)


def rounds(controller, control, gamma, accepted, times=20, exposed=0.0, transport=0.0):
    for _ in range(times):
        controller.observe_round(control, gamma, accepted, exposed, transport)


def test_nothing_is_limited_before_two_pass_sizes_are_measured():
    controller = GoodputController(max_batch=16)
    control = controller.join(8)
    assert controller.gamma(control) == 8
    for _ in range(10):
        controller.observe_pass(9, 0.04, committed=5)  # one size: no slope
    rounds(controller, control, 8, 0)
    assert controller.gamma(control) == 8
    cost = PassCost()
    for n in (1, 9):
        cost.observe(n, 0.02)  # two sizes, one pass each: too few
    assert cost.fit() is None


def test_the_fit_recovers_a_linear_pass_cost():
    controller = GoodputController(max_batch=16)
    passes(controller, 0.020, 0.002)
    assert controller.cost.fit() == pytest.approx((0.020, 0.002))


def test_the_plan_is_remade_every_few_passes_and_at_once_when_a_session_joins(monkeypatch):
    controller = GoodputController(max_batch=16)
    passes(controller, 0.020, 0.002)
    controls = [controller.join(4) for _ in range(2 * REPLAN_SESSIONS)]  # re-planned every 2 passes
    made = []
    plan = controller._plan
    monkeypatch.setattr(controller, "_plan", lambda: made.append(1) or plan())
    controller.gamma(controls[0])
    assert len(made) == 1
    for expected in (1, 2, 2, 3):
        controller.observe_pass(16, 0.052, committed=16)
        for control in controls:
            controller.gamma(control)
        assert len(made) == expected
    controls.append(controller.join(4))
    controller.gamma(controls[-1])
    assert len(made) == 4


def modelled(alphas, a, b, gammas):
    pass_s = a + b * sum(g + 1 for g in gammas)
    return sum(expected_tokens(al, g) / pass_s for al, g in zip(alphas, gammas))


def brute_force(alphas, ceilings, a, b):
    """The goodput-maximising gammas over every combination."""
    return max(itertools.product(*[range(c + 1) for c in ceilings]), key=lambda gs: modelled(alphas, a, b, gs))


@pytest.mark.parametrize("a, b", [(0.020, 0.0002), (0.020, 0.002), (0.005, 0.004)])
def test_the_plan_maximises_modelled_goodput(a, b):
    controller = GoodputController(max_batch=16)
    passes(controller, a, b)
    accepted = [(20, 18), (20, 10), (20, 2)]  # per round: drafted, accepted; from highly to barely predictable
    controls = [controller.join(6) for _ in accepted]
    for control, (g, acc) in zip(controls, accepted):
        for _ in range(30):
            controller.observe_round(control, g, acc, 0.0, 0.0)
    planned = tuple(controller.gamma(c) for c in controls)
    alphas = [controller.alpha(c) for c in controls]
    best = brute_force(alphas, [6, 6, 6], a, b)
    # Coordinate ascent: the exhaustive optimum's goodput, to within 0.5%.
    assert modelled(alphas, a, b, planned) == pytest.approx(modelled(alphas, a, b, best), rel=0.005)
    assert planned[0] >= planned[1] >= planned[2]  # the more predictable, the longer its drafts
    assert controller.predicted == pytest.approx(modelled(alphas, a, b, planned))


def test_a_session_whose_acceptance_collapses_stops_while_another_keeps_drafting():
    controller = GoodputController(max_batch=16)
    passes(controller, 0.020, 0.001)
    good, bad = controller.join(8), controller.join(8)
    rounds(controller, good, 8, 8)  # every draft accepted
    rounds(controller, bad, 8, 0, exposed=0.008, transport=0.003)  # every first draft rejected, and drafting costs
    assert controller.gamma(good) > 0
    assert controller.gamma(bad) == 0
    assert controller.not_speculating == 1


def test_a_stopped_session_is_reprobed_and_comes_back_when_its_acceptance_does():
    controller = GoodputController(max_batch=16)
    passes(controller, 0.020, 0.001)
    control = controller.join(8)
    rounds(controller, control, 8, 0, exposed=0.008, transport=0.003)
    seen = [controller.gamma(control) for _ in range(PROBE_EVERY)]
    assert seen[:-1] == [0] * (PROBE_EVERY - 1) and seen[-1] == PROBE_GAMMA  # a probe, after PROBE_EVERY rounds
    controller.observe_round(control, PROBE_GAMMA, PROBE_GAMMA, 0.0, 0.0)
    # The text turned predictable: probes accept everything, and drafting resumes.
    for _ in range(3 * PROBE_EVERY):
        g = controller.gamma(control)
        controller.observe_round(control, g, g, 0.0, 0.0)  # a round with no drafts tells nothing
    assert controller.gamma(control) > 0
    # Probes back off while acceptance stays collapsed.
    stopped = controller.join(8)
    rounds(controller, stopped, 8, 0, exposed=0.008, transport=0.003)
    probes = [n for n in range(200) if controller.gamma(stopped) > 0]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]


def test_the_client_gamma_is_a_ceiling_and_a_fixed_session_keeps_its_own():
    controller = GoodputController(max_batch=16)
    passes(controller, 0.020, 0.0)  # passes cost the same whatever their size: draft as much as allowed
    low, fixed = controller.join(3), controller.join(5, fixed=True)
    rounds(controller, low, 3, 3)
    assert controller.gamma(low) == 3
    assert controller.gamma(fixed) == 5
    collapsed = controller.join(5, fixed=True)
    rounds(controller, collapsed, 5, 0, exposed=0.01, transport=0.01)
    assert controller.gamma(collapsed) == 5  # a pinned schedule is never changed


def test_under_load_gammas_fall_as_passes_turn_compute_bound():
    def planned(sessions):
        controller = GoodputController(max_batch=16)
        passes(controller, 0.020, 0.002)
        controls = [controller.join(8) for _ in range(sessions)]
        for c in controls:
            rounds(controller, c, 8, 6)
        return [controller.gamma(c) for c in controls]

    alone, loaded = planned(1), planned(16)
    assert max(loaded) < alone[0]


def test_more_sessions_than_a_batch_share_the_passes():
    controller = GoodputController(max_batch=4)
    passes(controller, 0.020, 0.002)
    controls = [controller.join(8) for _ in range(8)]
    for c in controls:
        rounds(controller, c, 8, 6)
    for c in controls:
        controller.gamma(c)
    assert controller.predicted > 0
    for c in controls:
        controller.leave(c)
    assert controller.sessions == [] and controller.not_speculating == 0


def test_measured_goodput_is_committed_tokens_over_the_passes_span():
    controller = GoodputController(max_batch=4)
    controller.observe_pass(5, 0.5, committed=10, end=1.0)
    controller.observe_pass(5, 0.5, committed=10, end=2.0)
    assert controller.measured_goodput() == pytest.approx(20 / 1.5)


def drive(controller, controls, passes_n, spec_tokens, t=100.0):
    """Passes on the fitted line (20 ms + 2 ms a position); speculative passes commit
    ``spec_tokens``, plain ones a token per session."""
    for _ in range(passes_n):
        gammas = [controller.gamma(c) for c in controls]
        positions = sum(g + 1 for g in gammas)
        seconds = 0.020 + 0.002 * positions
        t += seconds
        controller.observe_pass(positions, seconds, spec_tokens if any(gammas) else len(controls), end=t)
    return t


@pytest.mark.parametrize("spec_tokens, plain_wins", [(8, True), (40, False)])
def test_where_the_model_is_unsure_the_replica_measures_plain_decoding_and_keeps_the_faster(spec_tokens, plain_wins):
    controller = GoodputController(max_batch=16)
    passes(controller, 0.020, 0.002)
    controls = [controller.join(4) for _ in range(8)]
    for c in controls:
        rounds(controller, c, 4, 2)
    assert controller.gamma(controls[0]) > 0 and 1 < controller.gain < CHECK_BELOW  # drafting pays, a little
    t = drive(controller, controls, CHECK_EVERY - 1, spec_tokens)
    assert not controller.check.plain_now and controller.check.checks == 0
    # The check: CHECK_PASSES passes of plain decoding, every session at gamma 0.
    t = drive(controller, controls, 1, spec_tokens, t)
    assert controller.check.plain_now and controller.not_speculating == len(controls)
    drive(controller, controls, CHECK_PASSES, spec_tokens, t)
    assert controller.check.checks == 1
    # 8 tokens a speculative pass: fewer than the model expects (drafting costs what it
    # cannot see): plain decoding measured faster, kept. 40: the plan measured faster.
    assert controller.check.plain is plain_wins
    assert all(controller.gamma(c) == 0 for c in controls) is plain_wins


def plain_measured_faster():
    """A controller whose one check found plain decoding faster for 8 drafting sessions:
    (controller, those sessions)."""
    controller = GoodputController(max_batch=16)
    passes(controller, 0.020, 0.002)
    controls = [controller.join(4) for _ in range(8)]
    for c in controls:
        rounds(controller, c, 4, 2)
    controller.gamma(controls[0])
    drive(controller, controls, CHECK_EVERY + CHECK_PASSES, 8)
    assert controller.check.checks == 1 and controller.check.plain
    return controller, controls


def test_target_only_requests_leave_the_measured_arm_alone():
    """A target-only request joins at gamma 0, fixed: it is in the passes' cost, never
    in the arms' comparison, and its passes do not reset the arm measured for the
    drafting sessions before it."""
    controller, controls = plain_measured_faster()
    for c in controls:
        controller.leave(c)
    target_only = [controller.join(0, fixed=True) for _ in range(8)]
    drive(controller, target_only, 3 * CHECK_EVERY, 8)
    assert controller.check.checks == 1 and controller.check.plain and controller.not_speculating == 0


def test_passes_while_every_drafting_sessions_worker_reads_its_prompt_leave_the_arm_alone():
    """Sessions decoding without drafts until their workers' first blocks come (a burst
    of new sessions) say nothing of either arm: their passes neither reset the measured
    arm nor count in a check. Once one of them can draft, passes count again."""
    controller, controls = plain_measured_faster()
    for c in controls:
        c.reading = True
    drive(controller, controls, 3 * CHECK_EVERY, 8)
    assert controller.check.checks == 1 and controller.check.plain and controller.check.passes == 0
    controls[0].reading = False
    drive(controller, controls, CHECK_EVERY, 8)
    assert controller.check.passes == CHECK_EVERY and controller.check.window is not None  # the next check begins


def test_where_the_model_is_sure_there_is_no_check():
    controller = GoodputController(max_batch=16)
    passes(controller, 0.020, 0.0001)  # nearly free positions: long drafts pay a lot
    control = controller.join(8)
    rounds(controller, control, 8, 8)
    controller.gamma(control)
    assert controller.gain > CHECK_BELOW
    drive(controller, [control], 3 * CHECK_EVERY, 9)
    assert controller.check.checks == 0 and controller.gamma(control) > 0


def test_a_first_round_that_read_the_prompt_counts_for_acceptance_not_for_the_draft_price():
    """A session's first block also read its prompt (the draft model's prefill, EAGLE's
    pass over the prompt's features): its wait says nothing of a draft's cost."""
    controller = GoodputController(4)
    control = controller.join(4)
    controller.observe_round(control, 4, 4, None, None)
    assert control.successes == 4 and control.late is None and controller.typical_late is None
    assert list(controller.waits.passes) == []
    controller.observe_round(control, 4, 2, 0.008, 0.001)  # late: 9 ms waited for 4 drafts
    assert control.late == 1.0 and controller.typical_late == 1.0 and list(controller.waits.passes) == [(4, pytest.approx(0.009))]
    controller.observe_round(control, 4, 4, 0.0, 0.0)  # on time
    assert control.late == pytest.approx(1 - LATE_WEIGHT) and len(controller.waits.passes) == 1


# -- late blocks: what a pass waits for (W) ---------------------------------------

SERVED = dict(a=0.015, b=0.0011)  # a served 16-stream replica's fitted pass cost on this CPU


def late_rounds(controller, control, gamma, accepted, late_share, wait, times=20):
    """Rounds of ``gamma`` drafts, ``accepted`` of them accepted, whose block kept the
    round waiting ``wait`` seconds (hop and exposed draft alike) in ``late_share`` of
    them, spread evenly, and was ready in the rest."""
    for n in range(times):
        late = int((n + 1) * late_share) > int(n * late_share)
        seconds = wait / 2 if late else 0.0
        controller.observe_round(control, gamma, accepted, seconds, seconds)


def modelled_with_waits(alphas, a, b, gammas, late, wait, cap):
    """The module docstring's goodput, one pass, written out per session; ``wait(g)``:
    (E[min(L, cap)], P(L > cap)) for a late block of g drafts."""
    one_pass = a + b * sum(g + 1 for g in gammas)
    own = [p * wait(g)[0] if g else 0.0 for p, g in zip(late, gammas)]
    missed = [p * wait(g)[1] if g else 0.0 for p, g in zip(late, gammas)]
    chances = [p for p, g in zip(late, gammas) if g]
    on_time = 1.0
    for p in chances:
        on_time *= 1 - p
    mean_wait = sum(own) / sum(chances) if sum(chances) else 0.0
    wait = min(cap, (1 - on_time) * mean_wait)
    return sum(expected_tokens(al, g) / ((1 + m) * (one_pass + wait)) for al, g, m in zip(alphas, gammas, missed))


@pytest.mark.parametrize("accepted, late_share, wait", [(3, 0.2, 0.004), (2, 0.5, 0.012), (3, 0.9, 0.030), (1, 1.0, 0.020)])
def test_the_plan_maximises_modelled_goodput_with_late_blocks(accepted, late_share, wait):
    controller = GoodputController(max_batch=16)
    passes(controller, SERVED["a"], SERVED["b"])
    controls = [controller.join(4) for _ in range(3)]
    for n, control in enumerate(controls):
        late_rounds(controller, control, 4, max(0, accepted - n), late_share, wait * (n + 1))
    planned = tuple(controller.gamma(c) for c in controls)
    alphas = [controller.alpha(c) for c in controls]
    # The cap as the plan took it (the batcher's, at the present plan's pass).
    cap = controller.cap
    timing = [[c.late for c in controls], lambda g: [float(x[0]) for x in controller.late_wait(np.array([g]), cap)]]
    args = (SERVED["a"], SERVED["b"])
    best = max(itertools.product(range(5), repeat=3), key=lambda gs: modelled_with_waits(alphas, *args, gs, *timing, cap))
    assert modelled_with_waits(alphas, *args, planned, *timing, cap) == pytest.approx(
        modelled_with_waits(alphas, *args, best, *timing, cap), rel=0.005)
    assert controller.predicted == pytest.approx(modelled_with_waits(alphas, *args, planned, *timing, cap))
    assert controller.gain >= 1.0 - 1e-9  # never a plan the model itself prices below plain decoding


def loaded(sessions, linger=0.5, accepted=3, late_share=0.5, wait=0.010):
    """``sessions`` sessions with measurements like a served sampled run's (acceptance
    about 0.75, blocks late by 10 ms in half the rounds): (controller, them, their gammas)."""
    controller = GoodputController(max_batch=16, linger=linger)
    passes(controller, SERVED["a"], SERVED["b"])
    controls = [controller.join(4) for _ in range(sessions)]
    for c in controls:
        late_rounds(controller, c, 4, accepted, late_share, wait)
    return controller, controls, [controller.gamma(c) for c in controls]


def test_a_late_block_keeps_the_whole_pass_waiting():
    """One session's late block is every session's cost: the pass lingers for it. Alone,
    a session with these measurements drafts; among 16 none does."""
    assert loaded(1)[2][0] > 0
    controller, _, gammas = loaded(16)
    assert gammas == [0] * 16 and controller.gain == pytest.approx(1.0)


def test_a_block_later_than_the_pass_waits_costs_its_round_a_whole_pass():
    """A pass waits at most linger x a pass for rounds still out; a block later than that
    misses it, and its round waits out the next pass. Four sessions, every other block
    late: by 1 ms they draft; by 25 ms (past the cap: the served sampled 4-stream
    replica's late blocks) they do not, where pricing only the wait past the cap let
    them (predicted 1.1-1.3x, measured 0.6x)."""
    controller, _, gammas = loaded(4, wait=0.001)
    assert all(gammas) and controller.cap > 0.001
    assert controller.late_wait(np.array([4]), controller.cap)[1][0] == 0.0  # none misses
    controller, _, gammas = loaded(4, wait=0.025)
    assert gammas == [0] * 4 and controller.cap < 0.025
    capped, missed = controller.late_wait(np.array([4]), controller.cap)
    assert missed[0] == 1.0 and capped[0] == pytest.approx(controller.cap)


def test_a_session_stopped_by_the_load_is_not_probed():
    """A probe is a late block the pass waits for: a session the load stops (it would
    not draft however well it accepted) is not probed; alone, the same session is.
    What the replica measured of late blocks ages while nothing drafts: in time, the
    plan tries drafting again."""
    clock = itertools.count(1)

    def rounds_of_all(controller, controls, n):
        planned, seconds = [], SERVED["a"] + SERVED["b"] * 16
        for _ in range(n):
            planned.append([controller.gamma(c) for c in controls])
            # (The plan is re-made every few passes.) Passes on a clock of their own: the measured arms
            # (arm_check.py) tie, and the arm in use is kept.
            controller.observe_pass(16, seconds, committed=16, end=next(clock) * seconds)
        return planned

    controller, controls, gammas = loaded(16, accepted=0)
    assert gammas == [0] * 16
    assert not any(map(any, rounds_of_all(controller, controls, PROBE_EVERY + 1)))  # no probe, though one is due
    assert any(map(any, rounds_of_all(controller, controls, 50 * AGE_ROUNDS)))
    controller, controls, gammas = loaded(1, accepted=0)
    assert gammas == [0]
    seen = [g for (g,) in rounds_of_all(controller, controls, PROBE_EVERY + 1)]
    assert seen.count(PROBE_GAMMA) == 1 and set(seen) == {0, PROBE_GAMMA}  # stopped by its acceptance: probed


def test_a_new_session_is_priced_by_the_replicas_block_times():
    """A session's first round is not timed (its block read the prompt), so until it
    has times of its own the plan prices its blocks by the replica's: under load a
    newcomer does not open with a draft that the pass would wait for."""
    controller, _, gammas = loaded(15)
    assert gammas == [0] * 15
    newcomer = controller.join(4)
    assert newcomer.late is None and controller.gamma(newcomer) == 0
    on_time = GoodputController(max_batch=16)
    passes(on_time, SERVED["a"], SERVED["b"])
    assert on_time.gamma(on_time.join(4)) > 0

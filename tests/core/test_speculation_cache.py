"""Outcome estimates for the speculation cache: a distribution over (accepted, token),
full acceptance with the likeliest bonus first, tracking the session's measured
acceptance; fan-out shrinks under load."""

import torch

from services.core.proposals import DraftAlternatives, Proposal
from services.core.speculation_cache import (
    AcceptanceHistory, MIN_BRANCH_PROB, Outcome, StepCosts, fanout_for_load, likely_outcomes,
)


def block(tokens, probs_of_drafts):
    """A chain whose draft i had probability probs_of_drafts[i], alternatives 50+i, 60+i."""
    ids, probs = [], []
    for i, (t, p) in enumerate(zip(tokens, probs_of_drafts)):
        rest = (1 - p) / 2
        ids.append([t, 50 + i, 60 + i])
        probs.append([p, rest * 1.5, rest * 0.5])
    return Proposal(tokens=torch.tensor(tokens), alternatives=DraftAlternatives(torch.tensor(ids), torch.tensor(probs)))


BONUS = DraftAlternatives(torch.tensor([[7, 8, 9]]), torch.tensor([[0.7, 0.2, 0.1]]))


def test_outcomes_form_a_distribution_with_plain_pipelining_first():
    b = block([3, 4, 5], [0.9, 0.8, 0.7])
    every = likely_outcomes(b, BONUS, 7, AcceptanceHistory(), limit=100)
    assert every[0] == Outcome(3, 7, every[0].prob)
    assert len({(o.accepted, o.token) for o in every}) == len(every)
    assert all(o.prob >= MIN_BRANCH_PROB for o in every[1:])
    assert sum(o.prob for o in every) <= 1 + 1e-9
    assert [o.prob for o in every[1:]] == sorted((o.prob for o in every[1:]), reverse=True)
    # A rejected draft is never its own correction.
    assert all(o.token != [3, 4, 5][o.accepted] for o in every if o.accepted < 3)
    assert len(likely_outcomes(b, BONUS, 7, AcceptanceHistory(), limit=3)) == 3


def test_the_exact_probabilities_with_no_history():
    """alpha = the draft's confidence while the session has measured nothing."""
    b = block([3, 4], [0.9, 0.6])
    got = {(o.accepted, o.token): o.prob for o in likely_outcomes(b, BONUS, 7, AcceptanceHistory(), limit=100)}
    assert abs(got[(2, 7)] - 0.9 * 0.6 * 0.7) < 1e-6
    # Draft 1 rejected after draft 0 accepted; its correction guessed as the draft's next likeliest (51).
    assert abs(got[(1, 51)] - 0.9 * 0.4 * (0.3 / 0.4)) < 1e-6
    assert abs(got[(0, 50)] - 0.1 * (0.075 / 0.1)) < 1e-6


def test_measured_acceptance_moves_the_estimate():
    b = block([3, 4, 5], [0.9, 0.9, 0.9])
    rarely = AcceptanceHistory()
    for _ in range(50):
        rarely.observe(3, 0)  # the first draft is nearly always rejected in this session
    full = lambda h: next(o.prob for o in likely_outcomes(b, BONUS, 7, h, limit=100) if o.accepted == 3)
    first = lambda h: sum(o.prob for o in likely_outcomes(b, BONUS, 7, h, limit=100) if o.accepted == 0)
    assert full(rarely) < full(AcceptanceHistory()) / 5
    assert first(rarely) > 0.5
    top = likely_outcomes(b, BONUS, 7, rarely, limit=2)
    assert top[1].accepted == 0


def test_history_counts_only_tested_drafts():
    h = AcceptanceHistory()
    h.observe(4, 1)  # draft 0 accepted, 1 rejected, 2 and 3 never tested
    h.observe(2, 2)
    assert h.reached == [2, 2, 0, 0] and h.accepted == [2, 1, 0, 0]


def test_a_proposer_without_alternatives_gets_one_guess():
    plain = Proposal(tokens=torch.tensor([3, 4]))
    assert likely_outcomes(plain, None, 9, AcceptanceHistory(), limit=4) == [Outcome(2, 9, 1.0)]
    assert likely_outcomes(plain, None, None, AcceptanceHistory(), limit=4) == []


def test_fanout_shrinks_to_one_guess_under_load():
    assert fanout_for_load(4, sessions=1, rows=16) == 4
    assert fanout_for_load(4, sessions=6, rows=16) == 2
    assert fanout_for_load(4, sessions=40, rows=16) == 1
    assert fanout_for_load(1, sessions=1, rows=16) == 1


def measured(costs: StepCosts, rows: int, seconds: float) -> None:
    if rows not in costs.warm:
        costs.observe(rows, 100.0)  # a size's first step is warm-up, not measured
        assert rows not in costs.seconds
    costs.observe(rows, seconds)


def test_rows_are_those_whose_steps_fit_in_the_verification():
    # This repo's CPU host: 9 steps of one row fit a 41 ms verification, of two do not.
    cpu = StepCosts()
    for rows, seconds in {1: 0.0037, 2: 0.005, 4: 0.0064, 8: 0.0081}.items():
        measured(cpu, rows, seconds)
    assert cpu.rows_within(16, steps=9, window_s=0.041) == 1
    # A GPU draft (host-bound steps) under a slower target's verification: eight fit.
    gpu = StepCosts()
    for rows in range(1, 17):
        measured(gpu, rows, 0.0024 + 0.0002 * rows)
    assert gpu.rows_within(16, steps=9, window_s=0.044) == 12  # 9 x 4.8 ms <= 44 ms < 9 x 5.0 ms
    assert gpu.rows_within(8, steps=9, window_s=0.045) == 8
    assert gpu.rows_within(16, steps=9, window_s=0.02) == 1  # a fast verifier: one guess
    # Nothing measured yet: one guess; a size not measured yet is tried once.
    assert StepCosts().rows_within(8, 9, 0.04) == 1 and gpu.rows_within(16, 9, None) == 1
    partial = StepCosts()
    measured(partial, 1, 0.001)
    assert partial.rows_within(8, 9, 0.04) == 2


def test_step_costs_follow_the_machine():
    costs = StepCosts(decay=0.5)
    measured(costs, 1, 0.001)
    measured(costs, 2, 0.01)
    assert costs.rows_within(4, 9, 0.03) == 1
    for _ in range(10):
        costs.observe(2, 0.002)  # the machine got less busy
    assert costs.rows_within(2, 9, 0.03) == 2
    probing = StepCosts(probe_every=3)
    measured(probing, 1, 0.001)
    measured(probing, 2, 0.1)
    assert [probing.rows_within(4, 9, 0.03) for _ in range(6)] == [1, 1, 2, 1, 1, 2]  # now and then, one more

"""The tree planner (core/tree_planner.py): it learns which paths the target accepts,
plans the tree that maximises tokens per unit of verify time, predicts what its rounds
accept, and plans nothing when drafting cannot pay."""

import numpy as np
from tiny_models import hf_greedy, random_heads, tiny

from services.core.engine import SpeculativeEngine
from services.core.gamma import GammaSchedule
from services.core.head_proposers import MedusaProposer
from services.core.target import TargetRunner
from services.core.tree import choice_tree, parse_choices
from services.core.tree_planner import TreePlanner
from services.core.verifier import TargetVerifier

INITIAL = choice_tree(parse_choices("0;1;0.0"))


def _simulate(planner: TreePlanner, accept, rounds: int, rng) -> None:
    """``accept(rng)``: the round's true accepted path if every candidate were there;
    the walk accepts the longest prefix of it that the planned tree holds."""
    for _ in range(rounds):
        tree = planner.tree
        if tree is None:
            continue
        truth, path = accept(rng), ()
        for rank in truth:
            if path + (rank,) not in tree.choices:
                break
            path += (rank,)
        planner.observe(tree, path)


def _correlated(rng) -> tuple[int, ...]:
    """Depth 1 is rank 0 70% of the time, else rank 1; below a rank-0 node the next
    is rank 0 with 80%; below a rank-1 node nothing is ever right (correlated misses)."""
    path = ()
    if rng.random() < 0.7:
        path = (0,)
        while len(path) < 4 and rng.random() < 0.8:
            path += (0,)
        return path
    return (1, 5)


def test_cheap_nodes_grow_the_tree_along_what_is_accepted():
    planner = TreePlanner(INITIAL, cost=1.0 + 0.01 * np.arange(33), max_depth=4, replan_every=50)
    rng = np.random.default_rng(0)
    _simulate(planner, _correlated, 1000, rng)
    tree = planner.tree
    assert (0, 0, 0, 0) in tree.choices and (1,) in tree.choices
    assert (1, 0) not in tree.choices  # never accepted below rank 1: it learnt the correlation
    # Once it has explored, its prediction matches what the planned rounds accept.
    planner.predicted_tokens = planner.measured_tokens = 0.0
    _simulate(planner, _correlated, 1000, rng)
    assert abs(planner.measured_over_predicted - 1.0) < 0.03, planner.measured_over_predicted


def test_costly_nodes_keep_the_tree_small():
    cheap = TreePlanner(INITIAL, cost=1.0 + 0.01 * np.arange(33), max_depth=4, replan_every=50)
    dear = TreePlanner(INITIAL, cost=1.0 + 0.3 * np.arange(33), max_depth=4, replan_every=50)
    for planner in (cheap, dear):
        _simulate(planner, _correlated, 1000, np.random.default_rng(1))
    assert 0 < len(dear.tree.choices) < len(cheap.tree.choices)


def test_it_plans_nothing_when_drafting_cannot_pay():
    planner = TreePlanner(INITIAL, cost=1.0 + 2.0 * np.arange(33), max_depth=4, replan_every=10)
    _simulate(planner, lambda rng: (3,), 200, np.random.default_rng(2))  # rank 3: never in the tree
    assert planner.tree is None and planner.predicted == 1.0


def test_a_stopped_plan_probes_the_tuned_tree_again():
    planner = TreePlanner(INITIAL, cost=1.0 + 2.0 * np.arange(33), max_depth=4, replan_every=10)
    _simulate(planner, lambda rng: (3,), 100, np.random.default_rng(2))
    assert planner.tree is None
    for _ in range(4 * 10):
        planner.idle()
    assert planner.tree is INITIAL and not planner.planned


def test_planned_medusa_decoding_is_target_only_decoding():
    """The engine feeds every round's path to the replica's planner; trees change, tokens do not."""
    target = tiny("llama", seed=0)
    planner = TreePlanner(INITIAL, cost=1.0 + 0.02 * np.arange(17), max_depth=3, replan_every=4)
    proposer = MedusaProposer(random_heads(target, seed=1, num_heads=3), INITIAL, planner=planner)
    engine = SpeculativeEngine(TargetVerifier(TargetRunner(target)), proposer, None, 256, GammaSchedule(8))
    for prompt in ([5, 6, 7, 8, 9, 10, 5, 6, 7], [11, 12, 11, 12, 11, 12, 40, 41]):
        assert engine.generate(prompt, 40).token_ids == hf_greedy(target, prompt, 40, eos=None)
    assert planner.rounds >= 8 and planner.planned and sum(planner.tries.values()) > 0

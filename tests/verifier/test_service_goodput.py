"""The served session loop and its replica's goodput controller (verifier <-> draft
worker over real gRPC on loopback): drafting switched off and on keeps the output, and
each request joins the plan as what it is."""

import pytest

from services.bench.loopback import Loopback, run
from services.core.goodput import GoodputController
from tiny_models import hf_greedy, noisy_copy, tiny

PROMPT = [5, 17, 33, 2, 9]


@pytest.fixture(scope="module")
def pair():
    target = tiny("llama", seed=1)
    return target, noisy_copy(target, seed=2, scale=0.3)


class ScriptedController(GoodputController):
    """A controller that turns drafting off for a stretch of rounds, then back on."""

    def __init__(self, caps):
        super().__init__(max_batch=16)
        self.caps = list(caps)

    def gamma(self, control):
        return self.caps.pop(0) if self.caps else 4


def test_drafting_switched_off_under_load_and_back_on_keeps_the_output(pair):
    target, draft = pair
    prompt = PROMPT

    async def go():
        async with Loopback(target, draft) as loop:
            loop.verifier.controller = ScriptedController([4, 4, 0, 0, 0, 0, 0, 3, 0, 4])
            return await loop.generate(prompt, 40, gamma=4)

    tokens, stats = run(go())
    assert tokens == hf_greedy(target, prompt, 40, eos=None)
    # Some rounds verified no drafts at all (plain decoding, no message to the worker),
    # and drafting resumed afterwards.
    assert stats.rounds > stats.drafted_per_position[0]  # rounds that drafted anything
    assert stats.accepted > 0


class JoinRecorder(GoodputController):
    """A goodput controller that records how each session joined its plan."""

    def __init__(self):
        super().__init__(max_batch=16)
        self.joins = []

    def join(self, ceiling, fixed=False):
        self.joins.append((ceiling, fixed))
        return super().join(ceiling, fixed)


def test_a_target_only_request_joins_the_plan_at_gamma_0_fixed_never_as_a_session_that_could_draft(pair):
    """Its passes count in the pass cost; it is never a load the arms are measured at
    (as one that could draft, its passes reset the replica's measured arm)."""
    target, draft = pair

    async def go():
        async with Loopback(target, draft) as loop:
            loop.verifier.controller = JoinRecorder()
            plain, _ = await loop.generate(PROMPT, 12, method="none", gamma=6)
            drafted, _ = await loop.generate(PROMPT, 12, gamma=6)
            return loop.verifier.controller.joins, plain, drafted

    joins, plain, drafted = run(go())
    assert joins == [(0, True), (6, False)]
    assert plain == drafted == hf_greedy(target, PROMPT, 12, eos=None)

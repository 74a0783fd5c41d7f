"""Heads on the verifier through VerifierService (in-process): MEDUSA, MTP and EAGLE
sessions (trees and chains) take their place in the goodput plan with their node
count, and greedy output is target-only decoding."""

import asyncio
import uuid

import pytest

from services.core.engine import SpeculativeEngine
from services.core.gamma import GammaSchedule
from services.core.sampling import SamplingParams
from services.core.target import TargetRunner
from services.core.verifier import TargetVerifier
from services.models.loading import bundled_paths
from services.models.pair import head_proposer, load_pair, load_pair_heads, make_engine
from services.rpc import internal_pb2, outrider_pb2
from services.rpc.convert import METHOD_IDS, sampling_to_proto
from services.verifier.service import VerifierService

PROMPT = "def parse_args(argv):"


@pytest.fixture(scope="module")
def pair():
    return load_pair(bundled_paths(), with_draft=False)


@pytest.mark.parametrize("method,tree", [("medusa", ""), ("mtp", ""), ("eagle", "3,2,6"), ("eagle", "")],
                         ids=["medusa", "mtp", "eagle-tree", "eagle-saved-chain"])
def test_head_sessions_are_planned_at_their_node_count_and_stay_exact(pair, method, tree):
    heads = load_pair_heads(pair.paths, method, pair.target)
    engine = SpeculativeEngine(TargetVerifier(TargetRunner(pair.target)), None, pair.eos_token_id, pair.max_context)

    async def no_drafter():
        raise AssertionError("heads draft on the verifier: no draft worker")

    service = VerifierService(engine, no_drafter, head_proposer=lambda m, tree: head_proposer(heads, tree))
    ids = pair.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    joined = []
    join = service.controller.join
    service.controller.join = lambda ceiling, fixed=False: joined.append((ceiling, fixed)) or join(ceiling, fixed)

    async def go():
        req = internal_pb2.VerifyRequest(
            request_id=uuid.uuid4().hex, session_id=uuid.uuid4().hex, prompt_ids=ids, max_new_tokens=32,
            sampling=sampling_to_proto(SamplingParams(seed=0)),
            speculation=outrider_pb2.Speculation(method=METHOD_IDS[method], gamma=8, tree=tree))
        return [t async for chunk in service.verify(req) for t in chunk.token_ids]

    tokens = asyncio.run(go())
    want = make_engine(pair, "none", GammaSchedule(initial=0)).generate(ids, 32, SamplingParams()).token_ids
    assert tokens == want
    assert len(joined) == 1 and joined[0][1] is True and joined[0][0] == head_proposer(heads, tree).max_nodes
    assert service.controller.sessions == []  # left at the end

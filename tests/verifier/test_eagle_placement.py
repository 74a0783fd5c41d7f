"""EAGLE-3 drafted on the draft worker (``eagle.placement: drafter``), over real gRPC on
loopback: with float32 features on the wire it drafts exactly what the verifier
placement drafts for the same committed tokens; greedy output is target-only decoding,
pipelined chains and trees alike; the early block drafted from the drafter's own
features is used when the round goes as guessed; a stream reopened on a worker starts
from the verifier's window of features."""

import grpc
import pytest
import torch

from services.bench.loopback import Loopback, run
from services.core.eagle_proposer import EagleTree
from services.core.engine import SpeculativeEngine
from services.core.gamma import GammaSchedule
from services.core.sampling import SamplingParams
from services.core.target import TargetRunner
from services.core.verifier import TargetVerifier
from services.drafter.service import DrafterService, make_proposers
from services.models.loading import bundled_paths
from services.models.pair import head_proposer, load_pair
from tiny_models import hf_greedy, qwen2_real_shape, random_eagle, tiny

PROMPT = list(range(20, 60))
GREEDY = SamplingParams(seed=0)


def lively_eagle(target):
    """A random drafter whose chains do not settle on one token at once."""
    drafter = random_eagle(target, 4)
    with torch.no_grad():
        for weight in drafter.midlayer.parameters():
            weight.mul_(3.0)
    return drafter


def record_proposals(engine: SpeculativeEngine, into: list) -> None:
    """Every proposal the engine verifies, with the committed length it follows."""
    verify = engine.verify_and_commit_batch

    def recorded(seqs, proposals):
        for seq, proposal in zip(seqs, proposals):
            parents = None if proposal.is_chain else proposal.tree.parents
            into.append((len(seq.committed), proposal.tokens.tolist(), parents))
        return verify(seqs, proposals)

    engine.verify_and_commit_batch = recorded


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tree", ["4,1,4", "4,3,10"], ids=["chain", "tree"])
def test_drafts_equal_the_verifier_placements_with_float32_features(family, tree):
    target = tiny(family, seed=0, layers=4)
    eagle = lively_eagle(target)
    shape = EagleTree.parse(tree)
    local, remote = [], []
    engine = SpeculativeEngine(TargetVerifier(TargetRunner(target, kv_cache_bytes=2**24)),
                               head_proposer(eagle, tree), None, 256, GammaSchedule(4))
    record_proposals(engine, local)
    expected = engine.generate(PROMPT, 30, GREEDY).token_ids

    async def go():
        async with Loopback(target, target, eagle=eagle, feature_dtype="float32") as loop:
            loop.verifier.controller = None  # the schedule's gamma every round, as in-process
            record_proposals(loop.verifier.engine, remote)
            return await loop.generate(PROMPT, 30, GREEDY, method="eagle", gamma=4, pipeline=False, tree=tree)

    tokens, stats = run(go())
    assert tokens == expected == hf_greedy(target, PROMPT, 30, eos=None)
    assert remote == local and len(local) > 5
    assert stats.draft_shape == shape.label and stats.drafted > 0
    rows = len(PROMPT) - 1 + 30 - 1  # every committed position but the last, in fp32
    assert stats.feature_bytes >= 4 * eagle.config.hidden_size * rows


@pytest.fixture(scope="module")
def bundled():
    pair = load_pair(bundled_paths(), heads=("eagle",))
    prompt = pair.tokenizer("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")["input_ids"]
    want = hf_greedy(pair.target, prompt, 48, eos=pair.tokenizer.eos_token_id)
    return pair, prompt, want


@pytest.mark.parametrize("tree", ["4,1,4", "4,2,8"], ids=["chain", "tree"])
def test_pipelined_greedy_is_target_only_and_early_chains_are_used(bundled, tree):
    pair, prompt, want = bundled

    async def go():
        async with Loopback(pair.target, pair.draft, pair.tokenizer.eos_token_id, 1024,
                            eagle=pair.heads["eagle"]) as loop:  # bfloat16 features
            return await loop.generate(prompt, 48, GREEDY, method="eagle", gamma=4, pipeline=True, tree=tree)

    tokens, stats = run(go())
    assert tokens == want
    assert stats.mean_acceptance_length > 2.0  # the trained drafter, fed bf16 features
    assert stats.pipeline_rounds == stats.rounds - 1
    if tree == "4,1,4":  # a chain: drafted ahead for full acceptance, from its own features
        assert stats.branches_drafted > 0 and stats.pipeline_hits > 0
    else:  # a tree's outcome is a path: the next round is drafted fresh
        assert stats.branches_drafted == 0 and stats.pipeline_hits == 0


class DroppingDrafter(DrafterService):
    """Fails the first stream after a few blocks, as a lost worker does; records how
    many feature rows each opened stream was sent."""

    def __init__(self, proposers, blocks_before_drop: int):
        super().__init__(proposers)
        self.left = blocks_before_drop
        self.opened_rows: list[int] = []

    async def _first_features(self, commands, session, rows):
        self.opened_rows.append(rows)
        await super()._first_features(commands, session, rows)

    async def Draft(self, request_iterator, context):
        async for block in super().Draft(request_iterator, context):
            if self.left == 0:
                self.left = -1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "worker lost")
            self.left -= 1
            yield block


def test_a_reopened_stream_starts_from_the_verifiers_window(bundled):
    pair, prompt, want = bundled
    window = 24

    async def go():
        loop = Loopback(pair.target, pair.draft, pair.tokenizer.eos_token_id, 1024, eagle=pair.heads["eagle"],
                        feature_window=window)
        loop.drafter = DroppingDrafter(make_proposers(pair.draft, eagle=pair.heads["eagle"])[0], blocks_before_drop=5)
        async with loop:
            result = await loop.generate(prompt, 48, GREEDY, method="eagle", gamma=4)
            return result, loop.drafter.opened_rows

    (tokens, stats), opened = run(go())
    assert tokens == want
    assert stats.draft_reconnects == 1
    # The first open sent the prompt's features (all but the last token's, which the first
    # round feeds); the reopened one the last `window` positions.
    assert opened == [min(window, len(prompt) - 1), window]
    assert stats.mean_acceptance_length > 2.0


def test_concurrent_sessions_are_batched_and_each_is_target_only(bundled):
    """Chains and trees from one draft worker, verified together in shared passes."""
    pair, _, _ = bundled
    prompts = ["def parse_args(argv):", "class Stack:\n    def push(self, item):", "import os\n\nfor name in"]
    ids = [pair.tokenizer(p)["input_ids"] for p in prompts]
    wants = [hf_greedy(pair.target, i, 32, eos=pair.tokenizer.eos_token_id) for i in ids]

    async def go():
        import asyncio

        async with Loopback(pair.target, pair.draft, pair.tokenizer.eos_token_id, 1024,
                            eagle=pair.heads["eagle"]) as loop:
            passes = []
            verify = loop.verifier.engine.verify_and_commit_batch
            loop.verifier.engine.verify_and_commit_batch = lambda seqs, props: passes.append(len(seqs)) or verify(seqs, props)
            results = await asyncio.gather(*(loop.generate(i, 32, GREEDY, method="eagle", gamma=4, tree=tree)
                                             for i, tree in zip(ids, ["4,1,4", "4,2,8", ""])))
            return results, passes

    results, passes = run(go())
    assert [tokens for tokens, _ in results] == wants
    assert max(passes) > 1  # some passes verified several sessions at once


@pytest.mark.parametrize("tree,joined", [("4,1,4", (4, True)), ("4,2,8", (8, True))], ids=["chain", "tree"])
def test_eagle_keeps_its_shape_in_the_plan(bundled, tree, joined):
    """Drafted on a worker, an EAGLE chain or tree keeps its shape in the goodput plan,
    at its node count, as on the verifier (planned, it was cut or switched off and ran
    slower: see VerifierService._join)."""
    pair, prompt, want = bundled
    calls = []

    async def go():
        async with Loopback(pair.target, pair.draft, pair.tokenizer.eos_token_id, 1024, eagle=pair.heads["eagle"]) as loop:
            join = loop.verifier.controller.join
            loop.verifier.controller.join = lambda ceiling, fixed=False: calls.append((ceiling, fixed)) or join(ceiling, fixed)
            return await loop.generate(prompt, 48, GREEDY, method="eagle", gamma=8, tree=tree)

    tokens, _ = run(go())
    assert tokens == want and calls == [joined]


@pytest.mark.parametrize("tree", ["4,1,4", "4,3,10"], ids=["chain", "tree"])
def test_a_real_vocabulary_and_a_long_prompt_sampled_match_the_verifier_placement(tree):
    """At real shapes: a Qwen2-shaped target with 151,936 tokens (GQA), a 3,000-token
    prompt in a 4k context, a 32k draft vocabulary, sampled. The prompt's features go in
    pieces with the open; with float32 features the seeded output is the verifier
    placement's, token for token."""
    target = qwen2_real_shape()
    eagle = random_eagle(target, 1, torch.randperm(151_936)[:32_768])
    prompt = torch.randint(0, 151_936, (3000,)).tolist()
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
    engine = SpeculativeEngine(TargetVerifier(TargetRunner(target, kv_cache_bytes=2**26)),
                               head_proposer(eagle, tree), None, 4096, GammaSchedule(4))
    expected = engine.generate(prompt, 24, params).token_ids

    async def go():
        async with Loopback(target, target, max_context=4096, kv_cache_bytes=2**26, eagle=eagle,
                            feature_dtype="float32", feature_window=4096) as loop:
            return await loop.generate(prompt, 24, params, method="eagle", gamma=4, pipeline=False, tree=tree)

    tokens, stats = run(go())
    assert tokens == expected and stats.drafted > 0
    assert stats.feature_bytes >= 4 * 64 * (3000 - 1)  # the whole prompt's features, fp32

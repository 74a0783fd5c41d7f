"""EAGLE-3 drafting on the verifier: greedy output is token-identical to transformers'
generate; every round's chain is exactly what the drafter gives under training-time
test on the whole sequence (the catch-up pass, the frontier rows and their crop lose
nothing); an oracle drafter gets whole paths accepted; EAGLE-2's tree keeps its budget
and is closed under ancestors."""

import pytest
import torch
from tiny_models import hf_greedy, random_eagle, random_mtp, tiny

from services.core.eagle_proposer import EagleProposer, EagleTree
from services.core.engine import SpeculativeEngine
from services.core.gamma import GammaSchedule
from services.core.mtp_proposer import MtpProposer
from services.core.sampling import SamplingParams
from services.core.target import TargetRunner
from services.core.tree import choice_tree, parse_choices
from services.core.verifier import TargetVerifier

PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7], [3], list(range(20, 60))]
CHAIN = EagleTree(depth=4, top_k=1, nodes=4)
TREE = EagleTree(depth=4, top_k=3, nodes=10)


def engine(target, proposer, gamma=4, eos=None):
    return SpeculativeEngine(TargetVerifier(TargetRunner(target, kv_cache_bytes=2**24)), proposer, eos, 256,
                             GammaSchedule(gamma))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("tree", [CHAIN, TREE], ids=["chain4", "tree10"])
def test_random_drafter_keeps_greedy_exact(family, tree):
    target = tiny(family, seed=0, layers=4)
    eng = engine(target, EagleProposer(random_eagle(target, 1), tree))
    for prompt in PROMPTS:
        result = eng.generate(prompt, 30)
        assert result.token_ids == hf_greedy(target, prompt, 30, eos=None)
        assert result.stats.drafted > 0 and result.stats.draft_shape == tree.label


def training_time_test_chain(drafter, target, committed: list[int], drafts: list[int]) -> list[int]:
    """Each step's top-1 at the drafting anchor, from the whole sequence at once, with
    the drafts as the tokens of the later steps (as drafting feeds them)."""
    with torch.no_grad():
        states = target(input_ids=torch.tensor([committed[:-1]]), output_hidden_states=True).hidden_states
        features = torch.cat([states[i] for i in drafter.layers], -1)  # f up to F
        logits = drafter.forward_train(features, torch.tensor([committed + drafts + [0]]), len(drafts))
    return [int(drafter.candidates(logits[s][0, len(committed) - 2], 1)) for s in range(len(drafts))]


@pytest.mark.parametrize("vocab", [None, torch.arange(0, 96, 2)], ids=["full", "draft-vocab"])
def test_each_round_drafts_what_training_time_test_gives(vocab):
    target = tiny("llama", seed=0, layers=4)
    drafter = random_eagle(target, 2, vocab)
    eng = engine(target, EagleProposer(drafter, CHAIN))
    seq = eng.start(PROMPTS[2], 40, SamplingParams())
    eng.prefill(seq)
    rounds = 0
    while not seq.finished:
        proposal = eng.propose(seq)
        drafts = proposal.tokens.tolist()
        assert drafts == training_time_test_chain(drafter, target, seq.committed, drafts)
        if vocab is not None:
            assert set(drafts) <= set(vocab.tolist())
        eng.verify_and_commit(seq, proposal)
        rounds += 1
    eng.release(seq)
    assert rounds > 5 and seq.generated == hf_greedy(target, PROMPTS[2], 40, eos=None)


class OracleEagle:
    """The real drafter (cache, masks and all), but logits that know the target's
    greedy text: a row at position p puts the truth x_{p+2} first, by a wide margin. A
    proposer that fed a row at the wrong position would draft wrong tokens."""

    def __init__(self, drafter, tokens: list[int]):
        self.drafter, self.tokens = drafter, tokens
        self.target_hidden, self.draft_vocab = drafter.target_hidden, None
        self.positions = None

    def __getattr__(self, name):  # new_cache, truncate, fuse
        return getattr(self.drafter, name)

    def step(self, feature, tokens, positions, mask=None, cache=None):
        self.positions = positions[0]
        return self.drafter.step(feature, tokens, positions, mask, cache)

    def logits(self, g):
        rows = self.positions[-len(g):] if g.dim() > 1 else self.positions[-1:]
        out = torch.zeros(len(rows), 96)
        for i, p in enumerate(rows.tolist()):
            if p + 2 < len(self.tokens):
                out[i, self.tokens[p + 2]] = 10.0
        return out if g.dim() > 1 else out[0]


@pytest.mark.parametrize("tree", [CHAIN, TREE], ids=["chain4", "tree10"])
def test_an_oracle_drafter_gets_whole_paths_accepted(tree):
    target = tiny("llama", seed=0, layers=4)
    want = hf_greedy(target, PROMPTS[0], 40, eos=None)
    oracle = OracleEagle(random_eagle(target, 1), PROMPTS[0] + want)
    result = engine(target, EagleProposer(oracle, tree)).generate(PROMPTS[0], 40)
    assert result.token_ids == want
    # The prompt's features come with the prefill: the first round drafts too.
    assert result.stats.mean_acceptance_length > 4.5, result.stats.to_dict()


def test_the_tree_keeps_its_budget_and_every_node_its_ancestors():
    target = tiny("llama", seed=0, layers=4)
    proposer = EagleProposer(random_eagle(target, 3), EagleTree(depth=5, top_k=4, nodes=12))
    eng = engine(target, proposer, gamma=5)
    seq = eng.start(PROMPTS[2], 30, SamplingParams())
    eng.prefill(seq)
    shapes = set()
    while not seq.finished:
        proposal = eng.propose(seq)
        assert proposal.tokens.tolist() == eng.propose(seq).tokens.tolist()  # proposing again reuses the draft
        if seq.draft_budget == 0:  # the last token: nothing to draft
            assert len(proposal) == 0
            eng.verify_and_commit(seq, proposal)
            continue
        shape = proposal.tree
        assert len(proposal) <= 12 and shape.max_depth <= min(5, seq.draft_budget)
        assert all(-1 <= p < i for i, p in enumerate(shape.parents))  # (tree_shape checks order too)
        siblings = {}
        for i, p in enumerate(shape.parents):  # no two siblings draft the same token
            assert int(proposal.tokens[i]) not in siblings.setdefault(p, set())
            siblings[p].add(int(proposal.tokens[i]))
        shapes.add(shape.parents)
        eng.verify_and_commit(seq, proposal)
    assert len(shapes) > 1  # dynamic: the shape follows the draft's confidence
    assert seq.generated == hf_greedy(target, PROMPTS[2], 30, eos=None)


def test_gamma_caps_the_depth_and_sampling_is_reproducible():
    target = tiny("llama", seed=0, layers=4)
    eng = engine(target, EagleProposer(random_eagle(target, 1), TREE), gamma=2)
    seq = eng.start(PROMPTS[0], 20, SamplingParams())
    eng.prefill(seq)
    assert eng.propose(seq).depth == 2
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
    first = eng.generate(PROMPTS[0], 30, params).token_ids
    assert first == eng.generate(PROMPTS[0], 30, params).token_ids and len(first) == 30


def test_a_restored_state_restarts_from_the_next_features():
    target = tiny("llama", seed=0, layers=4)
    proposer = EagleProposer(random_eagle(target, 1), CHAIN)
    eng = engine(target, proposer)
    seq = eng.start(PROMPTS[2], 30, SamplingParams())
    eng.prefill(seq)
    for _ in range(3):
        eng.step(seq)
    seq.draft_state = proposer.restore_state([])
    assert len(eng.propose(seq)) == 0
    eng.verify_and_commit(seq, eng.propose(seq))
    assert seq.draft_state.base == len(seq.committed) - 2 and len(eng.propose(seq)) == 4
    while not seq.finished:
        eng.step(seq)
    assert seq.generated == hf_greedy(target, PROMPTS[2], 30, eos=None)


def test_batched_with_mtp_and_target_only_sessions():
    target = tiny("llama", seed=0, layers=4)
    verifier = TargetVerifier(TargetRunner(target, kv_cache_bytes=2**24))
    eng = SpeculativeEngine(verifier, None, None, 256, GammaSchedule(3))
    wants = [hf_greedy(target, p, 25, eos=None) for p in PROMPTS]
    oracle = OracleEagle(random_eagle(target, 1), PROMPTS[0] + wants[0])
    proposers = [EagleProposer(oracle, TREE), EagleProposer(random_eagle(target, 2, layers=(0, 3)), CHAIN),
                 MtpProposer(random_mtp(target, 3), choice_tree(parse_choices("0;0.0"))), None]
    prompts, wants = PROMPTS + PROMPTS[:1], wants + wants[:1]
    seqs = [eng.start(p, 25, SamplingParams(), GammaSchedule(4), proposer=prop) for p, prop in zip(prompts, proposers)]
    for seq in seqs:
        eng.prefill(seq)
    while not all(seq.finished for seq in seqs):
        live = [seq for seq in seqs if not seq.finished]
        eng.verify_and_commit_batch(live, [eng.propose(seq) for seq in live])
    for seq, want in zip(seqs, wants):
        assert seq.generated == want
        eng.release(seq)
    assert seqs[0].stats.mean_acceptance_length > 3 and seqs[3].stats.drafted == 0
    assert verifier.runner.cached_positions() == 0


def test_tree_options_are_checked():
    assert EagleTree.parse("5,2,8") == EagleTree(5, 2, 8)
    for bad in ("5,2", "a,b,c", "0,2,8", "5,2,500"):
        with pytest.raises(ValueError, match="EAGLE tree"):
            EagleTree.parse(bad)


def lively_eagle(target):
    """A random drafter whose chains do not settle on one token at once (its layer's
    weights scaled up), so that equal chains mean something."""
    drafter = random_eagle(target, 4)
    with torch.no_grad():
        for weight in drafter.midlayer.parameters():
            weight.mul_(3.0)
    return drafter


@pytest.mark.parametrize("tree", [EagleTree(depth=4, top_k=1, nodes=4), EagleTree(depth=3, top_k=3, nodes=8)],
                         ids=["chain", "tree"])
def test_drafting_past_the_features_continues_the_chain(tree):
    """A draft worker drafts round k+1 before round k's features come: after a chain's
    tokens and its next token, from the drafter's own features. That is the chain
    drafted further, so the early block equals what the longer chain drafts there."""
    target = tiny("llama", seed=0, layers=4)
    drafter = lively_eagle(target)
    chain = EagleProposer(drafter, EagleTree(depth=12, top_k=1, nodes=12))
    eng = engine(target, chain)
    seq = eng.start(PROMPTS[2], 40, SamplingParams())
    eng.prefill(seq)
    eng.step(seq)  # a round in: the features came from a verify pass, not only the prefill
    long_chain = chain.propose(seq.draft_state, seq.committed, 12, SamplingParams()).tokens.tolist()
    assert len(long_chain) == 12 and len(set(long_chain)) > 3
    ahead = long_chain[:5]  # a round of 4 drafts, all accepted, and its bonus guessed right
    proposer = EagleProposer(drafter, tree)
    early = proposer.propose(seq.draft_state, seq.committed + ahead, 4, SamplingParams())
    if tree.top_k == 1:
        assert early.tokens.tolist() == long_chain[5:9]
    else:  # each node's first child is its top-1: first children from the root are the chain
        parents, path, node = early.tree.parents, [], -1
        while node in parents:
            node = parents.index(node)
            path.append(int(early.tokens[node]))
        assert len(path) >= 2 and path == long_chain[5:5 + len(path)]
    # The rows past the features were cropped: the state drafts as before for the committed text.
    assert chain.propose(seq.draft_state, seq.committed, 12, SamplingParams()).tokens.tolist() == long_chain
    eng.verify_and_commit(seq, eng.propose(seq))
    while not seq.finished:
        eng.step(seq)
    assert seq.generated == hf_greedy(target, PROMPTS[2], 40, eos=None)

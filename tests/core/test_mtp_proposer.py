"""MTP drafting on the verifier: greedy output is token-identical to transformers'
generate; every round's drafts are exactly what the modules give teacher-forced on
the whole sequence (the per-depth caches and frontier crops lose nothing); oracle
modules whose right answers sit at chosen ranks get whole trees accepted."""

import pytest
import torch
from tiny_models import hf_greedy, random_heads, random_mtp, tiny

from services.core.engine import SpeculativeEngine
from services.core.gamma import GammaSchedule
from services.core.head_proposers import MedusaProposer
from services.core.mtp_proposer import MtpProposer
from services.core.sampling import SamplingParams
from services.core.target import TargetRunner
from services.core.tree import choice_tree, parse_choices
from services.core.verifier import TargetVerifier

PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7], [3], list(range(20, 60))]
CHAIN3 = choice_tree(parse_choices("0;0.0;0.0.0"))
TREE = choice_tree(parse_choices("0;1;2;0.0;0.1;1.0;0.0.0;0.1.0;0.0.0.0"))


def engine(target, proposer, gamma=4, eos=None):
    return SpeculativeEngine(TargetVerifier(TargetRunner(target, kv_cache_bytes=2**24)), proposer, eos, 256,
                             GammaSchedule(gamma))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("tree", [CHAIN3, TREE], ids=["chain3", "tree9"])
def test_random_modules_keep_greedy_exact(family, tree):
    target = tiny(family, seed=0)
    eng = engine(target, MtpProposer(random_mtp(target, 1), tree))
    for prompt in PROMPTS:
        result = eng.generate(prompt, 30)
        assert result.token_ids == hf_greedy(target, prompt, 30, eos=None)
        assert result.stats.drafted > 0 and result.stats.draft_shape == tree.label


def teacher_forced_chain(modules, target, committed: list[int], drafts: list[int], depths: int) -> list[int]:
    """Each depth's top-1 at the drafting position, from the whole sequence at once."""
    with torch.no_grad():
        hidden = target.get_decoder()(torch.tensor([committed[:-1]])).last_hidden_state  # h^0 up to F
        logits = modules.forward_train(hidden, torch.tensor([committed + drafts]), depths)
    return [int(logits[k][0, len(committed) - 2].argmax()) for k in range(depths)]


@pytest.mark.parametrize("modules", [1, 3])
def test_each_round_drafts_what_teacher_forcing_gives(modules):
    """Depth 3 reuses the last module when there is one; every round, after rounds that
    accepted 0..3 tokens, the chain equals the from-scratch computation."""
    target = tiny("llama", seed=0)
    mtp = random_mtp(target, 2, modules)
    eng = engine(target, MtpProposer(mtp, CHAIN3))
    seq = eng.start(PROMPTS[2], 40, SamplingParams())
    eng.prefill(seq)
    rounds = 0
    while not seq.finished:
        proposal = eng.propose(seq)
        drafts = proposal.tokens.tolist()
        assert drafts == teacher_forced_chain(mtp, target, seq.committed, drafts, len(drafts))  # (capped at the end)
        eng.verify_and_commit(seq, proposal)
        rounds += 1
    eng.release(seq)
    assert rounds > 5 and seq.generated == hf_greedy(target, PROMPTS[2], 40, eos=None)


class OracleMtp:
    """Real modules (caches and all), but logits that know the target's greedy text:
    depth k's output at position j puts the truth x_{j+k+2} at rank ``ranks[k]``. A
    proposer that drafted at the wrong position would get wrong tokens."""

    def __init__(self, modules, tokens: list[int], ranks: list[int], vocab: int):
        self.modules, self.tokens, self.ranks, self.vocab = modules, tokens, ranks, vocab
        self.position = {}

    def new_cache(self):
        return self.modules.new_cache()

    def truncate(self, cache, length):
        self.modules.truncate(cache, length)

    def run_depth(self, depth, hidden, tokens, first, cache):
        self.position[depth] = first + len(tokens) - 1
        return self.modules.run_depth(depth, hidden, tokens, first, cache)

    def logits(self, depth, hidden):
        logits = torch.zeros(self.vocab)
        at = self.position[depth] + depth + 2
        if at < len(self.tokens):
            truth = self.tokens[at]
            order = [t for t in range(self.vocab) if t != truth]
            order.insert(self.ranks[depth], truth)
            logits[order] = -torch.arange(self.vocab, dtype=torch.float)
        return logits


@pytest.mark.parametrize("ranks,reachable", [([0, 0, 0, 0], 4), ([1, 0, 0, 0], 2), ([0, 1, 0, 0], 3),
                                                  ([0, 0, 1, 0], 2)])
def test_oracle_trees_accept_whole_paths(ranks, reachable):
    target = tiny("llama", seed=0)
    want = hf_greedy(target, PROMPTS[0], 40, eos=None)
    oracle = OracleMtp(random_mtp(target, 1), PROMPTS[0] + want, ranks, 96)
    result = engine(target, MtpProposer(oracle, TREE)).generate(PROMPTS[0], 40)
    assert result.token_ids == want
    stats = result.stats
    # The prompt's hidden states come with the prefill: the first round drafts too.
    assert 1 + 0.8 * reachable < stats.mean_acceptance_length <= 1 + reachable, stats.to_dict()
    assert stats.accepted_per_position[reachable - 1] > 0 == sum(stats.accepted_per_position[reachable:])


@pytest.mark.parametrize("max_new", [1, 2, 3, 5, 11])
def test_max_new_tokens_and_eos_inside_the_tree(max_new):
    target = tiny("llama", seed=0)
    ref = hf_greedy(target, PROMPTS[0], 40, eos=None)
    oracle = OracleMtp(random_mtp(target, 1), PROMPTS[0] + ref, [0, 0, 0, 0], 96)
    result = engine(target, MtpProposer(oracle, TREE)).generate(PROMPTS[0], max_new)
    assert result.token_ids == ref[:max_new] and result.stats.emitted == max_new
    eos = next(t for i, t in enumerate(ref) if i >= 5 and t not in ref[:i])
    want = hf_greedy(target, PROMPTS[0], 40, eos=eos)
    assert engine(target, MtpProposer(oracle, TREE), eos=eos).generate(PROMPTS[0], 40).token_ids == want


def test_batched_with_medusa_and_target_only_sessions():
    target = tiny("llama", seed=0)
    verifier = TargetVerifier(TargetRunner(target, kv_cache_bytes=2**24))
    eng = SpeculativeEngine(verifier, None, None, 256, GammaSchedule(3))
    wants = [hf_greedy(target, p, 25, eos=None) for p in PROMPTS]
    oracle = OracleMtp(random_mtp(target, 1), PROMPTS[0] + wants[0], [0, 1, 0, 0], 96)
    proposers = [MtpProposer(oracle, TREE), MedusaProposer(random_heads(target, 2), TREE),
                 MtpProposer(random_mtp(target, 3), CHAIN3), None]
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
    assert seqs[0].stats.mean_acceptance_length > 2.5 and seqs[3].stats.drafted == 0
    assert verifier.runner.cached_positions() == 0


def test_a_restored_state_restarts_from_the_next_hidden_states():
    """After a failover the modules' caches are gone: the next round drafts nothing, the
    one after drafts again, from a shorter context; output is unchanged."""
    target = tiny("llama", seed=0)
    proposer = MtpProposer(random_mtp(target, 1), CHAIN3)
    eng = engine(target, proposer)
    seq = eng.start(PROMPTS[2], 30, SamplingParams())
    eng.prefill(seq)
    for _ in range(3):
        eng.step(seq)
    seq.draft_state = proposer.restore_state([])
    assert len(eng.propose(seq)) == 0
    eng.verify_and_commit(seq, eng.propose(seq))
    assert seq.draft_state.base == len(seq.committed) - 2 and len(eng.propose(seq)) == 3
    while not seq.finished:
        eng.step(seq)
    assert seq.generated == hf_greedy(target, PROMPTS[2], 30, eos=None)


def test_gamma_caps_the_tree_depth_and_sampling_is_reproducible():
    target = tiny("llama", seed=0)
    proposer = MtpProposer(random_mtp(target, 1), TREE)
    eng = engine(target, proposer, gamma=2)
    seq = eng.start(PROMPTS[0], 20, SamplingParams())
    eng.prefill(seq)
    assert eng.propose(seq).depth == 2
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
    first = eng.generate(PROMPTS[0], 30, params).token_ids
    assert first == eng.generate(PROMPTS[0], 30, params).token_ids and len(first) == 30


def test_a_draft_vocabulary_keeps_every_depth_inside_it():
    target = tiny("llama", seed=0)
    mtp = random_mtp(target, 1)
    vocab = torch.arange(1, 96, 2)
    mtp.set_draft_vocab(vocab)
    eng = engine(target, MtpProposer(mtp, TREE))
    seq = eng.start(PROMPTS[2], 30, SamplingParams())
    eng.prefill(seq)
    while not seq.finished:
        proposal = eng.propose(seq)
        assert set(proposal.tokens.tolist()) <= set(vocab.tolist())
        eng.verify_and_commit(seq, proposal)
    assert seq.generated == hf_greedy(target, PROMPTS[2], 30, eos=None)

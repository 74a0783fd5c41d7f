"""Medusa-style tree drafting on the verifier: greedy output is token-identical to
transformers' generate, with real (random-init) heads in every family and with oracle
heads whose right answers sit at chosen sibling ranks, so that whole trees are accepted
and EOS and max_new_tokens land inside them."""

import pytest
import torch
from tiny_models import FAMILIES, hf_greedy, noisy_copy, random_heads, tiny

from services.core.engine import SpeculativeEngine
from services.core.gamma import GammaSchedule
from services.core.head_proposers import MedusaProposer
from services.core.proposers import DraftModelProposer
from services.core.sampling import SamplingParams
from services.core.target import TargetRunner
from services.core.tree import choice_tree, parse_choices
from services.core.verifier import TargetVerifier

PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7], [3], list(range(20, 60))]
TREE = choice_tree(parse_choices("0;1;2;0.0;0.1;1.0;0.0.0;0.1.0;0.0.0.0"))


class OracleHeads:
    """Knows the target's greedy text: finds the position whose hidden state it is given
    and puts the true token k+2 ahead at rank ``ranks[k]`` of head k."""

    def __init__(self, target, tokens: list[int], ranks: list[int]):
        captured = []
        hook = target.get_output_embeddings().register_forward_hook(lambda m, a, o: captured.append(a[0][0]))
        with torch.no_grad():
            target(input_ids=torch.tensor([tokens]))
        hook.remove()
        self.table, self.tokens, self.ranks = captured[0], tokens, ranks
        self.vocab = target.get_output_embeddings().weight.shape[0]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        i = int((self.table - hidden).norm(dim=-1).argmin())
        logits = torch.zeros(len(self.ranks), self.vocab)
        for k, rank in enumerate(self.ranks):
            if i + 2 + k >= len(self.tokens):
                break
            truth = self.tokens[i + 2 + k]
            order = [t for t in range(self.vocab) if t != truth]
            order.insert(rank, truth)
            logits[k, order] = -torch.arange(self.vocab, dtype=torch.float)
        return logits


def engine(target, proposer, gamma=4, eos=None):
    return SpeculativeEngine(TargetVerifier(TargetRunner(target, kv_cache_bytes=2**24)), proposer, eos, 256,
                             GammaSchedule(gamma))


@pytest.mark.parametrize("family", FAMILIES)
def test_random_heads_keep_greedy_exact(family):
    target = tiny(family, seed=0)
    eng = engine(target, MedusaProposer(random_heads(target, 1), TREE))
    for prompt in PROMPTS:
        result = eng.generate(prompt, 30)
        assert result.token_ids == hf_greedy(target, prompt, 30, eos=None)
        assert result.stats.drafted > 0


@pytest.mark.parametrize("ranks,reachable", [([0, 0, 0, 0], 4), ([1, 0, 0, 0], 2), ([0, 1, 0, 0], 3), ([2, 0, 0, 0], 1)])
def test_oracle_trees_accept_whole_paths(ranks, reachable):
    """``reachable``: how deep TREE holds the truth's path of ranks."""
    target = tiny("llama", seed=0)
    prompt = PROMPTS[0]
    want = hf_greedy(target, prompt, 40, eos=None)
    eng = engine(target, MedusaProposer(OracleHeads(target, prompt + want, ranks), TREE))
    result = eng.generate(prompt, 40)
    assert result.token_ids == want
    stats = result.stats
    assert 1 + 0.75 * reachable < stats.mean_acceptance_length <= 1 + reachable, stats.to_dict()
    assert stats.accepted_per_position[reachable - 1] > 0 == sum(stats.accepted_per_position[reachable:])
    assert stats.accepted_per_rank[max(ranks)] >= stats.rounds - 2  # every round but the first and last


@pytest.mark.parametrize("max_new", [1, 2, 3, 6, 11])
def test_max_new_tokens_inside_the_tree(max_new):
    target = tiny("llama", seed=0)
    prompt = PROMPTS[0]
    want = hf_greedy(target, prompt, 40, eos=None)
    eng = engine(target, MedusaProposer(OracleHeads(target, prompt + want, [0, 0, 0, 0]), TREE))
    result = eng.generate(prompt, max_new)
    assert result.token_ids == want[:max_new] and result.stats.emitted == max_new


def test_eos_inside_the_tree_stops_like_transformers():
    target = tiny("llama", seed=0)
    prompt = PROMPTS[0]
    ref = hf_greedy(target, prompt, 40, eos=None)
    eos = next(t for i, t in enumerate(ref) if i >= 5 and t not in ref[:i])
    want = hf_greedy(target, prompt, 40, eos=eos)
    assert want[-1] == eos and len(want) < 40
    eng = engine(target, MedusaProposer(OracleHeads(target, prompt + ref, [1, 0, 0, 0]), TREE), eos=eos)
    assert eng.generate(prompt, 40).token_ids == want


def test_trees_batched_with_chains_and_other_trees():
    """Medusa sessions with different trees and a draft-model chain session share every
    pass; each produces exactly what it would alone."""
    target = tiny("llama", seed=0)
    verifier = TargetVerifier(TargetRunner(target, kv_cache_bytes=2**24))
    eng = SpeculativeEngine(verifier, DraftModelProposer(noisy_copy(target, 1, 0.5)), None, 256, GammaSchedule(3))
    wants = [hf_greedy(target, p, 25, eos=None) for p in PROMPTS]
    narrow = choice_tree(parse_choices("0;0.0;0.1;0.0.0"))
    proposers = [MedusaProposer(OracleHeads(target, PROMPTS[0] + wants[0], [0, 1, 0, 0]), narrow),
                 None,  # the engine's draft model
                 MedusaProposer(random_heads(target, 2), TREE)]
    seqs = [eng.start(p, 25, SamplingParams(), proposer=prop) for p, prop in zip(PROMPTS, proposers)]
    for seq in seqs:
        eng.prefill(seq)
    while not all(seq.finished for seq in seqs):
        live = [seq for seq in seqs if not seq.finished]
        eng.verify_and_commit_batch(live, [eng.propose(seq) for seq in live])
    for seq, want in zip(seqs, wants):
        assert seq.generated == want
        eng.release(seq)
    assert verifier.runner.cached_positions() == 0


def test_sampled_medusa_is_reproducible_and_stays_in_vocabulary():
    target = tiny("llama", seed=0)
    eng = engine(target, MedusaProposer(random_heads(target, 1), TREE))
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
    first = eng.generate(PROMPTS[0], 30, params).token_ids
    assert first == eng.generate(PROMPTS[0], 30, params).token_ids and len(first) == 30


def test_a_draft_vocabulary_keeps_candidates_inside_it_and_output_exact(tmp_path):
    from services.models.heads import load_heads

    target = tiny("llama", seed=0)
    heads = random_heads(target, 1)
    vocab = torch.arange(2, 96, 3)  # a third of the tokens
    heads.set_draft_vocab(vocab)
    heads.save(tmp_path / "heads")
    loaded = load_heads(tmp_path / "heads", target)
    assert torch.equal(loaded.draft_vocab, vocab) and loaded.config.draft_vocab_size == len(vocab)
    torch.testing.assert_close(loaded(torch.ones(32))[0], target.get_output_embeddings()(
        loaded.blocks[0](torch.ones(32)))[vocab])  # the LM head's rows for the draft vocabulary
    proposer = MedusaProposer(loaded, TREE)
    eng = engine(target, proposer)
    seq = eng.start(PROMPTS[2], 20, SamplingParams())
    eng.prefill(seq)
    assert set(eng.propose(seq).tokens.tolist()) <= set(vocab.tolist())
    eng.release(seq)
    assert eng.generate(PROMPTS[2], 20).token_ids == hf_greedy(target, PROMPTS[2], 20, eos=None)

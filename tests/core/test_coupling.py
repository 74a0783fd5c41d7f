"""Coupled sampling (core/coupling.py): a seeded request's output is target-only
decoding's, whatever the drafter, gamma or batch, and follows the target's distribution."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from distribution import ALPHA, check_power, chi2_pvalue
from services.core.coupling import coupled_choice, gumbel
from services.core.engine import SpeculativeEngine
from services.core.gamma import GammaSchedule
from services.core.head_proposers import MedusaProposer
from services.core.proposers import DraftModelProposer, NgramProposer
from services.core.sampling import SamplingParams, adjusted_probs
from services.core.target import TargetRunner
from services.core.tree import choice_tree, parse_choices
from services.core.verifier import TargetVerifier
from tiny_models import noisy_copy, random_heads, tiny

PROMPT = [5, 6, 7, 8, 9, 10, 5, 6, 7]


def test_the_noise_is_standard_gumbel_keyed_by_seed_position_and_token():
    g = gumbel(7, torch.arange(4), 100_000)
    assert abs(g.mean().item() - 0.5772) < 0.01 and abs(g.std().item() - math.pi / math.sqrt(6)) < 0.01
    assert torch.equal(g, gumbel(7, torch.arange(4), 100_000))
    # Any subset of token ids gives the same values: the noise is a function of (seed, position, id).
    ids = torch.tensor([[3, 99_999, 12], [0, 1, 2], [5, 5, 5], [7, 8, 9]])
    assert torch.equal(gumbel(7, torch.arange(4), ids), g.gather(1, ids))
    assert not torch.equal(g[0], g[1]) and not torch.equal(g, gumbel(8, torch.arange(4), 100_000))


def test_noise_on_a_top_k_support_gives_the_same_choice_as_the_whole_vocabulary():
    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0)) * 3
    logp = adjusted_probs(logits, SamplingParams(temperature=0.9, top_k=40)).log()
    full, support = coupled_choice(logp, 5, torch.arange(6)), coupled_choice(logp, 5, torch.arange(6), top_k=40)
    assert torch.equal(full.argmax(-1), support.argmax(-1))
    assert torch.isfinite(support).sum() == 6 * 40


def test_gumbel_max_draws_follow_the_distribution():
    rng = np.random.default_rng(0)
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    n = 60_000
    check_power(n, probs, rng)
    draws = (torch.tensor(probs).log().float() + gumbel(11, torch.arange(n), len(probs))).argmax(-1).numpy()
    assert chi2_pvalue(draws, probs) > ALPHA


def engine(target, proposer=None, gamma=4):
    return SpeculativeEngine(TargetVerifier(TargetRunner(target)), proposer, None, 256, GammaSchedule(gamma))


@pytest.fixture(scope="module")
def target():
    return tiny("llama", seed=0)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, seed=123),
                                    SamplingParams(temperature=0.7, top_k=20, seed=5),
                                    SamplingParams(temperature=1.3, top_p=0.9, seed=9)])
def test_seeded_output_is_target_only_output_whatever_the_drafter_and_gamma(target, params):
    plain = engine(target).generate(PROMPT, 40, params)
    assert plain.stats.drafted == 0
    drafters = [(DraftModelProposer(noisy_copy(target, 1, 0.5)), g) for g in (1, 3, 7)]
    drafters += [(NgramProposer(), 4),
                 (MedusaProposer(random_heads(target, 1), choice_tree(parse_choices("0;1;2;0.0;0.1;1.0;0.0.0"))), 8)]
    for proposer, gamma in drafters:
        result = engine(target, proposer, gamma).generate(PROMPT, 40, params)
        assert result.token_ids == plain.token_ids, f"{type(proposer).__name__} gamma {gamma}"
    # A different seed is a different draw.
    assert engine(target).generate(PROMPT, 40, SamplingParams(params.temperature, params.top_k, params.top_p,
                                                                seed=params.seed + 1)).token_ids != plain.token_ids


def test_a_batch_of_coupled_and_other_rows_keeps_each_rows_tokens(target):
    """Coupled rows share passes with greedy and unseeded sampled rows; each coupled row
    commits what it commits alone, and a draft that is the target itself is never rejected
    (it draws under the verifier's very noise)."""
    eng = engine(target, DraftModelProposer(target), 4)
    coupled = [SamplingParams(temperature=1.0, seed=s) for s in range(3)]
    alone = [engine(target).generate(PROMPT, 30, p).token_ids for p in coupled]
    seqs = [eng.start(PROMPT, 30, p) for p in coupled]
    seqs += [eng.start(PROMPT, 30, SamplingParams()), eng.start(PROMPT, 30, SamplingParams(temperature=1.0))]
    while not all(s.finished for s in seqs):
        live = [s for s in seqs if not s.finished]
        eng.verify_and_commit_batch(live, [eng.propose(s) for s in live])
    for seq, want in zip(seqs[:3], alone):
        assert seq.generated == want
        assert seq.stats.accepted == seq.stats.drafted > 0


def test_coupled_speculative_decoding_follows_the_target_jointly():
    """Over many seeds, (x1, x2) from a drafted round follows p(x1) p(x2 | x1): the draft
    (a noisy copy, often wrong) decides how many tokens a round commits, not which."""
    V = 24
    target = tiny("llama", seed=3, vocab=V)
    draft = noisy_copy(target, 4, 0.6)
    prompt, n = [2, 3, 4], 6_000
    cfg = dict(temperature=1.0)
    eng = engine(target, DraftModelProposer(draft), 2)
    pairs = [tuple(eng.generate(prompt, 2, SamplingParams(**cfg, seed=s)).token_ids) for s in range(n)]
    with torch.no_grad():
        p1 = adjusted_probs(target(torch.tensor([prompt])).logits[0, -1], SamplingParams(**cfg))
        p2 = adjusted_probs(target(torch.tensor([[*prompt, x] for x in range(V)])).logits[:, -1], SamplingParams(**cfg))
    joint = (p1[:, None] * p2).double().numpy().reshape(-1)
    joint /= joint.sum()
    counts = np.bincount([a * V + b for a, b in pairs], minlength=V * V)
    keep = joint * n >= 5  # chi-square cells with enough expected mass; the rest pooled
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(joint[keep], joint[~keep].sum())
    assert chisquare(observed, expected / expected.sum() * observed.sum()).pvalue > ALPHA

"""The rejection sampler reproduces the target's adjusted distribution exactly.

Power: with N draws over V cells, a 5% relative bias adds about N * 0.05^2 = 100 to
the chi-square statistic at N = 40000, far past the 1e-4 critical value (~29 for
7 degrees of freedom); ``test_chi_square_detects_a_5_percent_bias`` checks that the
same test, at the same N, fails a 5%-biased sampler.
"""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from services.core.rejection import accept_greedy, accept_sampled
from services.core.sampling import SamplingParams, adjusted_probs, sample

V = 8
N = 40_000
ALPHA = 1e-4
CONFIGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.8),
]


def _logits(seed: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 1.5


def _chi2_pvalue(tokens: np.ndarray, probs: np.ndarray) -> float:
    support = probs > 0
    counts = np.bincount(tokens, minlength=V)
    assert counts[~support].sum() == 0, "sampled a token the adjusted target forbids"
    if support.sum() == 1:  # a one-token distribution: the support check above is the test
        return 1.0
    expected = probs[support].astype(np.float64)
    return chisquare(counts[support], expected / expected.sum() * len(tokens)).pvalue


def _simulate(params: SamplingParams, gamma: int, seed: int, positions: int, deterministic: bool):
    """Decode `positions` tokens with prefix-independent targets p_t and drafts q_t
    (depending only on the absolute position t), round after round, with the real
    acceptance rule. Each emitted token t must then be distributed as p_t."""
    p = adjusted_probs(_logits(seed, positions + gamma + 1), params)  # [T, V]
    q = adjusted_probs(_logits(seed + 1000, positions + gamma + 1), params)
    gen = torch.Generator().manual_seed(seed)
    out = np.empty((N, positions), dtype=np.int64)
    for trial in range(N):
        emitted: list[int] = []
        while len(emitted) < positions:
            t = len(emitted)
            if deterministic:  # an n-gram-like proposer: fixed guesses, one-hot q
                draft = torch.arange(t, t + gamma) % V
                q_used = None
            else:
                draft = sample(q[t : t + gamma], gen)
                q_used = q[t : t + gamma]
            emitted += accept_sampled(draft, q_used, p[t : t + gamma + 1], gen).tokens
        out[trial] = emitted[:positions]
    return out, p.numpy()


@pytest.mark.parametrize("params", CONFIGS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_sampled_tokens_follow_target_distribution(params):
    tokens, p = _simulate(params, gamma=3, seed=11, positions=2, deterministic=False)
    for t in range(2):
        assert _chi2_pvalue(tokens[:, t], p[t]) > ALPHA


def test_deterministic_proposals_are_lossless():
    params = SamplingParams(temperature=0.9)
    tokens, p = _simulate(params, gamma=2, seed=5, positions=2, deterministic=True)
    for t in range(2):
        assert _chi2_pvalue(tokens[:, t], p[t]) > ALPHA


def test_chi_square_detects_a_5_percent_bias():
    p = adjusted_probs(_logits(3, 1), SamplingParams(temperature=1.0))[0].numpy()
    biased = p * np.where(np.arange(V) % 2 == 0, 1.05, 0.95)
    biased /= biased.sum()
    tokens = np.random.default_rng(0).choice(V, size=N, p=biased)
    assert _chi2_pvalue(tokens, p) < ALPHA


def test_unadjusted_draft_probs_are_caught():
    """Testing against q without the same top-k adjustment as p is the vLLM #10198 bug;
    the statistical test must see it."""
    params = SamplingParams(temperature=1.0, top_k=3)
    p = adjusted_probs(_logits(21, 2), params)
    q_raw = _logits(22, 1).softmax(-1)  # wrong: q not adjusted like p
    gen = torch.Generator().manual_seed(0)
    firsts = []
    for _ in range(N // 4):
        draft = sample(q_raw, gen)
        firsts.append(accept_sampled(draft, q_raw, p, gen).tokens[0])
    naive = np.asarray(firsts)
    # The sampler itself stays lossless for *any* q it is told the truth about:
    assert _chi2_pvalue(naive, p[0].numpy()) > ALPHA
    # ...but lying about q (drafting from q_raw, claiming adjusted q) biases the output.
    q_adj = adjusted_probs(_logits(22, 1), params)
    lied = []
    for _ in range(N // 4):
        draft = sample(q_raw, gen)
        lied.append(accept_sampled(draft, q_adj, p, gen).tokens[0])
    assert _chi2_pvalue(np.asarray(lied), p[0].numpy()) < ALPHA


def test_greedy_accepts_matching_prefix_then_corrects():
    logits = torch.full((4, V), -10.0)
    best = [2, 5, 1, 7]
    for i, b in enumerate(best):
        logits[i, b] = 10.0
    full = accept_greedy(torch.tensor([2, 5, 1]), logits)
    assert (full.num_accepted, full.tokens) == (3, [2, 5, 1, 7])
    partial = accept_greedy(torch.tensor([2, 4, 1]), logits)
    assert (partial.num_accepted, partial.tokens) == (1, [2, 5])
    none = accept_greedy(torch.tensor([3]), logits[:2])
    assert (none.num_accepted, none.tokens) == (0, [2])

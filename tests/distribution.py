"""Chi-square checks that emitted tokens follow a distribution, with a power check.

Power: a 3% relative bias adds about n * 0.03^2 to the chi-square statistic over n
draws; ``check_power`` asserts that the same test at the same n fails a 3%-biased
sample at ALPHA, so a passing test means something.
"""

import numpy as np
from scipy.stats import chisquare

ALPHA = 1e-4


def chi2_pvalue(tokens: np.ndarray, probs: np.ndarray) -> float:
    support = probs > 0
    counts = np.bincount(tokens, minlength=len(probs))
    assert counts[~support].sum() == 0, "emitted a token the adjusted target forbids"
    if support.sum() == 1:
        return 1.0
    expected = probs[support].astype(np.float64)
    return chisquare(counts[support], expected / expected.sum() * len(tokens)).pvalue


def check_power(n: int, probs: np.ndarray, rng: np.random.Generator) -> None:
    """The test at this n rejects a 3%-biased version of probs."""
    assert has_power(n, probs, rng), f"no power at n={n}"


def has_power(n: int, probs: np.ndarray, rng: np.random.Generator) -> bool:
    if (probs > 0).sum() < 2:
        return True  # a point mass: one forbidden token emitted fails chi2_pvalue's assert
    if n == 0:
        return False
    biased = probs * np.where(np.arange(len(probs)) % 2 == 0, 1.03, 0.97)  # +3% / -3% on alternate tokens
    biased /= biased.sum()
    return chi2_pvalue(rng.choice(len(probs), size=n, p=biased), probs) < ALPHA

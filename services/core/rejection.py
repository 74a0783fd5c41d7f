"""Acceptance of a drafted chain against the target (Leviathan et al.; Chen et al.).

For drafts x_1..x_g sampled from q_1..q_g, and target distributions p_1..p_{g+1}
(all after the same temperature/top-k/top-p adjustment):

    accept x_i with probability min(1, p_i(x_i) / q_i(x_i)), in order;
    at the first rejection i, emit a token from norm(max(0, p_i - q_i)) and stop;
    if all g are accepted, emit a bonus token from p_{g+1}.

Every emitted token is then distributed exactly as p at its own prefix. Greedy is the
same rule with one-hot p and q: accept while x_i == argmax p_i.
"""

from __future__ import annotations

import torch

from .proposals import VerifyOutcome
from .sampling import sample


def accept_greedy(draft: torch.Tensor, target_logits: torch.Tensor) -> VerifyOutcome:
    """draft [g], target_logits [g+1, V]."""
    best = target_logits.argmax(-1).tolist()  # [g+1]
    drafted = draft.tolist()
    n = 0
    while n < len(drafted) and drafted[n] == best[n]:
        n += 1
    return VerifyOutcome(num_accepted=n, tokens=drafted[:n] + [best[n]])


def accept_sampled(
    draft: torch.Tensor,  # [g] int64
    draft_probs: torch.Tensor | None,  # [g, V] q; None = one-hot q on the draft tokens
    target_probs: torch.Tensor,  # [g+1, V] adjusted p
    generator: torch.Generator,
) -> VerifyOutcome:
    g = int(draft.shape[0])
    rows = torch.arange(g, device=draft.device)
    p_x = target_probs[rows, draft]  # [g]
    q_x = draft_probs[rows, draft] if draft_probs is not None else torch.ones_like(p_x)
    # u < p/q  <=>  u * q < p, which also avoids dividing by q.
    u = torch.rand(g, generator=generator, device=draft.device)
    rejected = (u * q_x >= p_x).nonzero()
    n = int(rejected[0]) if rejected.numel() else g
    if n == g:
        final = target_probs[g]  # bonus token from p_{g+1}
    else:
        q_n = draft_probs[n] if draft_probs is not None else _one_hot_like(target_probs[n], int(draft[n]))
        residual = (target_probs[n] - q_n).clamp_min(0)
        mass = residual.sum()
        # mass > 0 whenever a rejection can happen; guard float round-off regardless.
        final = residual / mass if mass > 0 else target_probs[n]
    token = int(sample(final[None], generator)[0])
    return VerifyOutcome(num_accepted=n, tokens=draft[:n].tolist() + [token])


def _one_hot_like(row: torch.Tensor, index: int) -> torch.Tensor:
    out = torch.zeros_like(row)
    out[index] = 1
    return out

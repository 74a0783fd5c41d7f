"""Coupled sampling for seeded requests: the output is a function of (prompt, sampling
parameters, seed) alone, and equals target-only decoding's with the same seed, whatever
the drafter, gamma, batch, pipelining or replica.

Gumbel-max: drawing token x from p is x = argmax_v (log p(v) + G(v)) with G(v) i.i.d.
standard Gumbel. The noise at sequence position j is keyed by (seed, j) and by the
token id v, and nothing else:

    target-only decoding commits  y_j = argmax_v (log p_j(v) + G_j(v)),
    the drafter proposes          x_j = argmax_v (log q_j(v) + G_j(v))   (the same noise),
    the verifier accepts x_j iff  x_j == y_j, and at the first mismatch commits y_j.

Every committed token is y_j, computed from the target's own p_j at the committed
prefix (which is made of earlier y's) and from G_j: exactly what target-only decoding
commits, so the output distribution is the target's and the tokens are the same. The
draft only decides how many positions one round commits, never which tokens. The
acceptance test becomes the greedy one over perturbed logits, so every greedy
guarantee and code path (chains, trees, pipelining, the speculation cache, the goodput
controller) holds for seeded sampling, and a seeded request needs no pinned gamma.

The price is acceptance: two argmaxes under shared noise agree less often than
rejection sampling accepts (sum_v min(p, q)). On the bundled pair, over held-out text,
0.740 against 0.792 a token at T = 1.0 and 0.776 against 0.815 at T = 0.7. This is
Daliri, Musco and Suresh's "drafter-invariant speculative decoding" (2024), who bound
the agreement below by (1 - TV) / (1 + TV), the best any protocol without
communication can guarantee. Unseeded requests keep rejection
sampling (core/rejection.py), whose acceptance is the highest possible.

The noise is a counter-based hash (splitmix64's finalizer) in int64 tensor arithmetic,
not a torch generator: the same bits on every device and process, so a CPU draft
worker reproduces a GPU verifier's noise, and it can be evaluated at any subset of
token ids. Uniforms have 53 bits; the Gumbel transform runs in float64 and is rounded
to float32 (its last bit may differ between CPU and CUDA ``log``: that can only cost a
draft its acceptance, never change what the verifier commits on one device).
"""

from __future__ import annotations

import torch

from .sampling import derive_seed

_MASK = (1 << 64) - 1


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= _MASK
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
_TOKEN = _signed(0xD6E8FEB86659FD93)


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer: int64 multiplication wraps, as uint64's would."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """``_mix`` in place, with one scratch tensor: over a [R, V] block at V = 128k, a
    fresh int64 tensor per step cost more in allocation and page faults than the
    arithmetic."""
    tmp = torch.empty_like(z)
    for bits, multiplier in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, bits, out=tmp)
        z.bitwise_xor_(tmp.bitwise_and_((1 << (64 - bits)) - 1))
        if multiplier is not None:
            z.mul_(multiplier)
    return z


def gumbel(seed: int, positions: torch.Tensor, ids: torch.Tensor | int) -> torch.Tensor:
    """Standard Gumbel noise G_j(v) for each position j in ``positions`` [R] (int64) and
    each token id v: of ``ids`` [R, K] (int64), or of the whole vocabulary when ``ids``
    is its size V. Returns [R, K] or [R, V] float32 on ``positions``' device."""
    device = positions.device
    key = _signed(derive_seed(seed, "gumbel"))
    row = _mix(positions.long()[:, None] * _GOLDEN + key)  # [R, 1]
    if isinstance(ids, int):
        bits = (torch.arange(ids, device=device) * _TOKEN)[None, :].repeat(row.shape[0], 1)  # [R, V]
    else:
        bits = ids.long() * _TOKEN  # [R, K]
    _mix_(bits.bitwise_xor_(row))
    u = bits.bitwise_right_shift_(11).bitwise_and_((1 << 53) - 1).double().add_(0.5).mul_(2.0**-53)  # in (0, 1), 53 bits
    return u.log_().neg_().log_().neg_().float()


def coupled_choice(logprobs: torch.Tensor, seed: int, positions: torch.Tensor, top_k: int = 0) -> torch.Tensor:
    """logprobs [R, V] (of the adjusted distribution: -inf outside its support) at
    ``positions`` [R] -> the Gumbel-max scores [R, V] whose argmax is the coupled draw.
    With ``top_k`` (0 < top_k < V, the support's size at most), noise is drawn for the
    support only: the same argmax, k hashes a row instead of V (at V = 128k and top-k
    50, the difference between a pass's noise costing seconds and microseconds on a CPU)."""
    logprobs = logprobs.float()
    positions = positions.to(logprobs.device)
    V = logprobs.shape[-1]
    if not 0 < top_k < V:
        return logprobs + gumbel(seed, positions, V)
    ids = logprobs.topk(top_k, dim=-1).indices  # [R, k]: the support (and -inf fillers)
    scores = torch.full_like(logprobs, float("-inf"))
    return scores.scatter_(-1, ids, logprobs.gather(-1, ids) + gumbel(seed, positions, ids))

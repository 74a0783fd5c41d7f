"""The draft distribution q in a form whose size does not grow with the vocabulary.

The acceptance test needs q exactly as each draft token was sampled from it, but any
q keeps the output exactly the target's (Leviathan et al., Theorem 1): losslessness
only asks that the drafter sample from the very q it reports. So the drafter maps
its adjusted distribution to a compact q' first, samples from q', and sends only q':

- support: the top tokens, at most ``MAX_SUPPORT``, whose probability is at least
  ``RANGE`` times the top one's; each gets a log-scale level (one byte, steps of
  6.5%);
- tail: everything else shares one weight, spread evenly over the tokens outside the
  support (top-k and top-p leave it at exactly 0).

Weights are integers (``LEVEL_WEIGHTS[level]`` and the tail's), summed exactly in
int64, and q' = weight / sum in float64, then float32: drafter and verifier derive
bit-identical q' on any device and in any reduction order.

What it costs in acceptance (sum_x min(p(x), q'(x)) against the full q's): under
top-k or top-p only the levels' rounding (-0.0001 measured); at plain temperature 1.0
also the tail's shape, not its mass. Measured by ``outrider bench --scale``. On the wire a support token costs about two
bytes (a varint id delta and its level).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .sampling import keyed_generator, sample_from

MAX_SUPPORT = 3072  # support tokens per draft, at most
RANGE = 1e-7  # support tokens have q >= RANGE * max q
LEVELS = 255  # level 1..255; 0 marks padding
_STEP = math.log(1 / RANGE) / (LEVELS - 1)
_SCALE = 2**32  # integer weight of the top token
LEVEL_WEIGHTS = torch.tensor(
    [0] + [round(_SCALE * math.exp(-(LEVELS - level) * _STEP)) for level in range(1, LEVELS + 1)], dtype=torch.int64
)


@dataclass(frozen=True)
class SparseQ:
    """q' for each of N drafts: a support padded to the widest (level 0), and a tail."""

    ids: torch.Tensor  # [N, K] int64 support token ids, ascending (0 in padding)
    levels: torch.Tensor  # [N, K] uint8 log-scale levels, 0 = padding
    tail_weight: torch.Tensor  # [N] int64 weight shared by the tokens outside the support
    vocab: int
    probs: torch.Tensor  # [N, K] float32 q'(id)
    tail: torch.Tensor  # [N] float32 q'(x) of each token outside the support

    @classmethod
    def of(cls, ids: torch.Tensor, levels: torch.Tensor, tail_weight: torch.Tensor, vocab: int) -> "SparseQ":
        """The one place q' is derived from what goes on the wire."""
        weights = LEVEL_WEIGHTS.to(ids.device)[levels.long()]  # [N, K]
        total = (weights.sum(-1) + tail_weight).to(torch.float64)  # exact integers
        outside = (vocab - (levels > 0).sum(-1)).clamp_min(1).to(torch.float64)
        probs = (weights.to(torch.float64) / total[:, None]).to(torch.float32)
        tail = (tail_weight.to(torch.float64) / total / outside).to(torch.float32)
        return cls(ids.long(), levels.to(torch.uint8), tail_weight.long(), vocab, probs, tail)

    @classmethod
    def stack(cls, rows: list["SparseQ"]) -> "SparseQ":
        """Rows of one draft each ([1, K_i]) -> [N, max K_i]."""
        width = max(row.ids.shape[-1] for row in rows)
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1]))  # noqa: E731
        return cls.of(torch.cat([pad(r.ids) for r in rows]), torch.cat([pad(r.levels) for r in rows]),
                      torch.cat([r.tail_weight for r in rows]), rows[0].vocab)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def rows(self, start: int) -> "SparseQ":
        """The drafts from ``start`` on."""
        return SparseQ(self.ids[start:], self.levels[start:], self.tail_weight[start:], self.vocab,
                       self.probs[start:], self.tail[start:])

    def __reduce__(self):
        """Pickled (by Ray; to a tensor-parallel group's rank 0) as its wire fields in
        numpy, and derived again on load by ``of``: a third of the bytes, and numpy
        arrays pickle about ten times faster than torch tensors (a batch of 8 rows of 8
        drafts took 7 ms to pickle and load as tensors). Loads on the CPU."""
        wire = (self.ids.to(torch.int32), self.levels, self.tail_weight)
        return _from_wire, tuple(t.cpu().numpy() for t in wire) + (self.vocab,)

    def dense(self) -> torch.Tensor:
        """[N, V] float32 q'."""
        out = self.tail[:, None].expand(len(self), self.vocab).clone()
        # Support ids are distinct within a row; padding adds 0.
        return out.scatter_add_(-1, self.ids, torch.where(self.levels > 0, self.probs - self.tail[:, None], 0.0))

    def sample(self, seed: int, position: int) -> int:
        """Draw row 0's token (a one-draft q') for absolute position ``position``, from
        the stream keyed by (seed, position): an early block and a fresh block drafting
        the same position draw the same numbers."""
        generator = keyed_generator(seed, f"draft@{position}", self.ids.device)
        u = torch.rand(2, generator=generator, device=self.ids.device)
        support = self.levels[0] > 0
        ids = self.ids[0, support]
        outside = self.vocab - ids.shape[0]
        buckets = torch.cat([self.probs[0, support], self.tail[:1] * outside])  # [K + 1]: the tail is one bucket
        index = int(sample_from(buckets, u[0]))
        if index < ids.shape[0]:
            return int(ids[index])
        # The j-th token outside the support: j plus the support ids at or before it.
        j = min(int(u[1] * outside), outside - 1)
        before = ids - torch.arange(ids.shape[0], device=ids.device)  # outside tokens before each support id
        return j + int(torch.searchsorted(before, torch.tensor(j, device=ids.device), right=True))


def _from_wire(ids: np.ndarray, levels: np.ndarray, tail_weight: np.ndarray, vocab: int) -> SparseQ:
    return SparseQ.of(torch.from_numpy(ids), torch.from_numpy(levels), torch.from_numpy(tail_weight), vocab)


def compact(q: torch.Tensor, max_support: int = MAX_SUPPORT) -> SparseQ:
    """An adjusted q [V] -> its compact form q' [1, K]."""
    V = q.shape[-1]
    q = q.float()
    values, ids = q.topk(min(max_support, V))  # descending
    size = int((values >= values[0] * RANGE).sum())
    values, ids = values[:size], ids[:size]
    levels = (LEVELS + torch.log(values / values[0]) / _STEP).round().clamp(1, LEVELS).to(torch.uint8)
    # Mass outside the support, summed from those tokens themselves: exactly 0 when
    # top-k or top-p already zeroed them.
    tail_mass = q.scatter(0, ids, torch.zeros_like(values)).sum()
    tail_weight = (tail_mass / values[0] * _SCALE).round().to(torch.int64)
    order = ids.argsort()
    return SparseQ.of(ids[order][None], levels[order][None], tail_weight[None], V)


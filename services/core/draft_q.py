"""The draft distribution q in a form whose size does not grow with the vocabulary.

The acceptance test needs q exactly as each draft token was sampled from it, but any
q keeps the output exactly the target's (Leviathan et al., Theorem 1): losslessness
only asks that the drafter sample from the very q it reports. So the drafter
truncates and quantizes its adjusted distribution first, then samples from the
result, and sends only that:

- support: the fewest top tokens holding all but ``TAIL`` of the mass, at most
  ``MAX_SUPPORT`` of them (top-k 50 needs at most 50);
- weights: uint16, relative to the top token; q = weight / sum(weights), computed in
  float64 from integers, so drafter and verifier get bit-identical float32 q on any
  device and in any reduction order.

What it costs: acceptance is sum_x min(p(x), q'(x)); renormalising q over a support
S only raises q' on S, so acceptance drops by at most the mass cut off,
sum_{x not in S} min(p(x), q(x)) <= TAIL when the cap does not bind. The cap binds
only on nearly flat distributions (measured by ``outrider bench --scale``). On the
wire a draft costs 6 bytes per support token: at most 6 KiB, 48 KiB at gamma 8,
against 4.9 MB for a dense float32 q at V = 152k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import exponentials, keyed_generator, sample_from

TAIL = 1e-3  # mass a drafter may cut from its q
MAX_SUPPORT = 1024  # support tokens per draft, at most
WEIGHT_MAX = 65535  # uint16
BYTES_PER_TOKEN = 6  # int32 id + uint16 weight


@dataclass(frozen=True)
class SparseQ:
    """q for each of N drafts on its own support, padded to the widest (weight 0)."""

    ids: torch.Tensor  # [N, K] int64 support token ids (0 in padding)
    weights: torch.Tensor  # [N, K] int32 quantized weights, 0 = padding
    probs: torch.Tensor  # [N, K] float32 weights / row sum: the q each draft was sampled from

    @classmethod
    def from_weights(cls, ids: torch.Tensor, weights: torch.Tensor) -> "SparseQ":
        """ids, weights [N, K]; the one place q is derived from weights."""
        w = weights.to(torch.float64)
        probs = (w / w.sum(-1, keepdim=True).clamp_min(1)).to(torch.float32)
        return cls(ids=ids.long(), weights=weights.int(), probs=probs)

    @classmethod
    def stack(cls, rows: list["SparseQ"]) -> "SparseQ":
        """Rows of one draft each ([1, K_i]) -> [N, max K_i]."""
        width = max(row.ids.shape[-1] for row in rows)
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1]))  # noqa: E731
        return cls(*(torch.cat([pad(getattr(row, name)) for row in rows]) for name in ("ids", "weights", "probs")))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def wire_bytes(self) -> int:
        return int((self.weights > 0).sum()) * BYTES_PER_TOKEN

    def dense(self, vocab: int) -> torch.Tensor:
        """[N, V] float32."""
        return torch.zeros(len(self), vocab, device=self.ids.device).scatter_add_(-1, self.ids, self.probs)

    def sample(self, seed: int, position: int) -> int:
        """Draw the draft token of row 0 (a one-draft q) for absolute position
        ``position``, from the stream keyed by (seed, position): an early block and a
        fresh block drafting the same position draw the same numbers."""
        generator = keyed_generator(seed, f"draft@{position}", self.ids.device)
        index = sample_from(self.probs[0], exponentials(generator, self.ids.shape[-1], self.ids.device))
        return int(self.ids[0, index])


def compact(q: torch.Tensor, tail: float = TAIL, max_support: int = MAX_SUPPORT) -> SparseQ:
    """An adjusted q [V] -> its truncated, quantized form [1, K]."""
    values, ids = q.float().topk(min(max_support, q.shape[-1]))  # descending
    # The fewest top tokens whose mass reaches 1 - tail (the top one always).
    size = int((values.cumsum(0) < 1 - tail).sum()) + 1
    values, ids = values[:size], ids[:size]
    weights = (values / values[0] * WEIGHT_MAX).round().int()
    size = int((weights > 0).sum())  # quantized to nothing: out of the support
    return SparseQ.from_weights(ids[None, :size], weights[None, :size])


def one_hot(tokens: torch.Tensor) -> SparseQ:
    """q of deterministic drafts (greedy drafting, n-gram lookup): a point mass [N, 1]."""
    ones = torch.ones(len(tokens), 1, dtype=torch.int32, device=tokens.device)
    return SparseQ.from_weights(tokens[:, None], ones)

"""Acceptance of drafted chains against the target, for a whole batch at once, on the
target's device (Leviathan et al.; Chen et al.; batched as in vLLM v1).

For drafts x_1..x_g sampled from q_1..q_g, and target distributions p_1..p_{g+1}
(all after the same temperature/top-k/top-p adjustment):

    accept x_i with probability min(1, p_i(x_i) / q_i(x_i)), in order;
    at the first rejection i, emit a token from norm(max(0, p_i - q_i)) and stop;
    if all g are accepted, emit a bonus token from p_{g+1}.

Every emitted token is then distributed exactly as p at its own prefix. Greedy is the
same rule with one-hot p and q: accept while x_i == argmax p_i. Greedy and sampled rows
share a pass; each row draws from its own keyed random stream, so a row's tokens never
depend on which other rows share its batch.

Nothing here waits on the host: the first rejection of every row is one comparison and
a cumulative product, and the correction or bonus token is an inverse-CDF draw from the
unnormalised residual (core/sampling.py ``sample_from``). The caller syncs once, for
the [B, 2] result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .draft_q import SparseQ
from .sampling import SamplingRows, adjusted_probs_rows, common_device, keyed_generator, sample_from


@dataclass(frozen=True)
class DraftBatch:
    """Every row's drafts, right-padded to the longest."""

    tokens: torch.Tensor  # [B, G] int64 drafted token ids (0 in padding)
    num_drafts: torch.Tensor  # [B] int64 g_b, the row's real drafts
    q_ids: torch.Tensor  # [B, G, K] int64 support of each draft's q'
    q_probs: torch.Tensor  # [B, G, K] float32 q' on that support (0 = padding)
    q_tail: torch.Tensor  # [B, G] float32 q' of each token outside the support

    @classmethod
    def of(cls, drafts: list[tuple[torch.Tensor, SparseQ | None]], vocab: int, device: torch.device | str) -> "DraftBatch":
        """(tokens [g_b], q' or None for a one-hot q) per row. The per-row copies run
        where the rows already are (the host, for drafts that came over the wire), and
        the batch crosses to ``device`` once per field: on a GPU, a copy or kernel per
        row and field costs more than the whole acceptance."""
        B, lens = len(drafts), [len(tokens) for tokens, _ in drafts]
        G = max(lens, default=0)
        home = common_device([t for t, _ in drafts] + [q.ids for _, q in drafts if q is not None], device)
        tokens = torch.zeros(B, G, dtype=torch.long, device=home)
        for b, (row, _) in enumerate(drafts):
            tokens[b, : lens[b]] = row
        if all(q is None for _, q in drafts):  # deterministic drafts: every q is a point mass
            valid = torch.arange(G, device=home)[None, :] < torch.tensor(lens, device=home)[:, None]
            q_ids, q_probs, q_tail = tokens[..., None], valid[..., None].float(), torch.zeros(B, G, device=home)
        else:
            K = max(q.ids.shape[-1] for row, q in drafts if q is not None and len(row))
            q_ids = torch.zeros(B, G, K, dtype=torch.long, device=home)
            q_probs = torch.zeros(B, G, K, device=home)
            q_tail = torch.zeros(B, G, device=home)
            for b, (row, q) in enumerate(drafts):
                g = lens[b]
                if not g:
                    continue
                if q is None:  # a point mass on the draft (q' 1 there, 0 elsewhere)
                    q_ids[b, :g, 0] = row
                    q_probs[b, :g, 0] = 1.0
                    continue
                k = q.ids.shape[-1]
                q_ids[b, :g, :k] = q.ids
                q_probs[b, :g, :k] = q.probs
                q_tail[b, :g] = q.tail
        return cls(tokens=tokens.to(device), num_drafts=torch.tensor(lens, dtype=torch.long).to(device),
                   q_ids=q_ids.to(device), q_probs=q_probs.to(device), q_tail=q_tail.to(device))

    def residual_(self, p: torch.Tensor, at: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """max(0, p - scale * q'), q' of draft at[b] of every row b, in place over p [B, V]
        (non-negative; a row with scale 0 keeps its p). q' is its tail but on its K
        support tokens, so this is one pass over the vocabulary and a scatter of K
        entries: a dense q' costs four passes more, and on a CPU each pass over [B, V]
        (4 MB at batch 8, V = 128k) is memory-bound, about 1 ms."""
        ar = torch.arange(at.shape[0], device=at.device)
        scale = scale.to(p.dtype)[:, None]  # [B, 1]
        ids, probs = self.q_ids[ar, at], self.q_probs[ar, at]  # [B, K]
        tail = self.q_tail[ar, at][:, None] * scale  # [B, 1]
        q = torch.where(probs > 0, probs * scale, tail)  # [B, K]
        # Padding entries repeat the row's first one, so that duplicate ids write one value.
        pad = probs <= 0
        ids, q = torch.where(pad, ids[:, :1], ids), torch.where(pad, q[:, :1], q)
        support = (p.gather(-1, ids) - q).clamp_min_(0)
        return p.sub_(tail).clamp_min_(0).scatter_(-1, ids, support)

    def q_at(self, at: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """q' of draft at[b] at tokens[b], for every row b: [B]."""
        ar = torch.arange(at.shape[0], device=at.device)
        hit = (self.q_ids[ar, at] == tokens[:, None]) & (self.q_probs[ar, at] > 0)  # [B, K]
        return torch.where(hit.any(-1), (self.q_probs[ar, at] * hit).sum(-1), self.q_tail[ar, at])


@dataclass(frozen=True)
class Randomness:
    """Every number a pass's acceptance draws, from each row's own keyed stream."""

    uniforms: torch.Tensor  # [B, G] U(0, 1), one per acceptance test
    final: torch.Tensor  # [B] U(0, 1), for the correction or bonus token

    @classmethod
    def draw(cls, keys: list[tuple[int, int] | None], num_drafts: list[int], G: int,
             device: torch.device | str) -> "Randomness":
        """keys[b]: (seed, round) of a sampled row, None for a greedy row (draws nothing).
        A row's draws depend only on its key and its own draft count. They come from a
        host generator and cross to ``device`` in one copy: a handful of numbers a row
        is not worth a device generator and kernels per row, and a host stream draws
        the same on every replica, whatever its device (a stream resumed on a GPU
        replica after a CPU one, or back, continues exactly)."""
        draws = torch.ones(len(keys), G + 1)  # [B, G+1]: the acceptance tests' uniforms, then the final draw
        draws[:, G] = 0
        for b, key in enumerate(keys):
            if key is None:
                continue
            row = torch.rand(num_drafts[b] + 1, generator=keyed_generator(key[0], f"verify:{key[1]}"))
            draws[b, : num_drafts[b]] = row[:-1]
            draws[b, G] = row[-1]
        draws = draws.to(device)
        return cls(draws[:, :G], draws[:, G])


def accept_batch(logits: torch.Tensor, drafts: DraftBatch, rows: SamplingRows, rand: Randomness,
                 consume: bool = False) -> torch.Tensor:
    """logits [B, G+1, V]: row b's target logits p_1..p_{g_b+1} in its first g_b+1 slots.
    Returns [B, 2] int64: (accepted drafts n_b, the token emitted after them).
    ``consume``: the logits are the caller's to overwrite (``adjusted_probs_rows``)."""
    B, G1, V = logits.shape
    G = G1 - 1
    ar = torch.arange(B, device=logits.device)
    valid = torch.arange(G, device=logits.device)[None, :] < drafts.num_drafts[:, None]  # [B, G]
    accepted = torch.zeros(B, G, dtype=torch.bool, device=logits.device)
    best = None
    if rows.greedy_rows:
        best = logits.argmax(-1)  # [B, G+1]
        accepted = drafts.tokens == best[:, :G]  # greedy: the draft is the target's argmax
    p = None
    if rows.any_sampled:
        p = adjusted_probs_rows(logits, rows, consume)  # [B, G+1, V]
        p_x = p[:, :G].gather(-1, drafts.tokens[..., None])[..., 0]  # [B, G] p_i(x_i)
        hit = (drafts.q_ids == drafts.tokens[..., None]) & (drafts.q_probs > 0)  # [B, G, K]
        q_x = torch.where(hit.any(-1), (drafts.q_probs * hit).sum(-1), drafts.q_tail)  # [B, G] q_i(x_i)
        # u < p/q  <=>  u * q < p, which also avoids dividing by q.
        accepted = torch.where(rows.greedy[:, None], accepted, rand.uniforms * q_x < p_x)
    # n_b = drafts accepted before the first rejection (or all g_b).
    n = (accepted & valid).long().cumprod(-1).sum(-1)  # [B]
    if p is None:
        return torch.stack([n, best[ar, n]], -1)
    p_n = p[ar, n]  # [B, V] (a copy)
    rejected = n < drafts.num_drafts  # [B]: the token at n is a correction, not a bonus
    if G:
        residual = drafts.residual_(p_n, n.clamp(max=G - 1), rejected)  # max(0, p - q'); a bonus row keeps p
        # residual is nonzero whenever a rejection can happen; guard float round-off
        # (the check is free on a CPU, a sync on a GPU, where the fallback costs little).
        usable = residual.sum(-1) > 0
        if residual.device.type != "cpu" or not bool(usable.all()):
            residual = torch.where(usable[:, None], residual, p[ar, n])
        p_n = residual
    token = sample_from(p_n, rand.final)  # unnormalised is fine
    if best is not None:
        token = torch.where(rows.greedy, best[ar, n], token)
    return torch.stack([n, token], -1)


def accept_greedy_chains(logits: torch.Tensor, drafts: list[torch.Tensor]) -> list[tuple[int, list[int]]]:
    """``accept_batch`` for a batch whose rows are all greedy chains: logits [B, G+1, V],
    drafts[b] [g_b] int64. Returns, per row, (accepted drafts n_b, the tokens the row
    commits: those drafts and the target's token after them). Greedy acceptance needs
    only the argmax: one reduction and one host sync, instead of the sampler's few
    dozen small ops (about 0.3 ms a round on a CPU, 3% of a bundled target step when
    decoding one stream)."""
    B, G1, _ = logits.shape
    flat = torch.cat([logits.argmax(-1).flatten()] + [d.to(logits.device) for d in drafts]).tolist()
    out, at = [], B * G1
    for b, d in enumerate(drafts):
        best, mine = flat[b * G1 : (b + 1) * G1], flat[at : at + len(d)]
        at += len(d)
        # n = drafts before the first that is not the target's argmax (or all of them).
        n = next((i for i, (x, y) in enumerate(zip(mine, best)) if x != y), len(mine))
        out.append((n, mine[:n] + [best[n]]))
    return out

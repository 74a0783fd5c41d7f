"""Logit shaping: penalties, logit bias and min_tokens, applied to the target's and the
draft's logits in the same way, before the standardized sampling map (core/sampling.py).

Every rule depends on the tokens before the position it shapes, and inside a round
that includes the drafts before it: the target's logits at slot t of a chain were
computed after drafts 1..t, and a tree node's after its ancestors and itself. Shaping
each slot with its own prefix makes the verifier's p exactly the shaped target's
distribution at that prefix, so rejection sampling keeps the output distribution the
shaped target's, whatever the drafter did (a drafter that shapes the same way is only
accepted more often).

The rules, in transformers' order:
    repetition (CTRL, Keskar et al. 2019; transformers' RepetitionPenaltyLogitsProcessor):
        every token in the prompt or the output so far: l -> l / r if l > 0 else l * r;
    presence and frequency (OpenAI's): over the output so far, l -> l - f * count - p * [count > 0];
    logit bias: l -> l + bias[token];
    min_tokens: the stop ids (EOS included) get -inf while fewer than min_tokens tokens
        have been generated (transformers' MinNewTokensLengthLogitsProcessor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import SamplingParams, SamplingRows, adjusted_probs_rows
from .tree import TreeShape


@dataclass(frozen=True)
class ShapeRow:
    """One sequence's share of a batch of logits to shape."""

    params: SamplingParams  # penalties, stop rule and prompt_len resolved
    committed: list[int]  # prompt + output so far
    drafts: list[int]  # the round's drafts after committed (slots 1..N shape after them)
    tree: TreeShape | None = None  # the drafts' tree; None = a chain


def shapes(params: SamplingParams) -> bool:
    return params.penalties.active or (params.stop is not None and params.stop.min_tokens > 0 and bool(params.stop.token_ids))


def shape_logits(logits: torch.Tensor, rows: list[ShapeRow | None]) -> torch.Tensor:
    """logits [B, N+1, V] (row b's slot 0 after its committed tokens, slot i+1 after
    draft node i) -> float32 logits with each row's rules applied at each slot. Rows
    given as None, or whose rules are all off, are returned unchanged; with no row to
    shape, ``logits`` itself is returned (no copy)."""
    active = [b for b, row in enumerate(rows) if row is not None and shapes(row.params)]
    if not active:
        return logits
    out = logits.float().clone()
    for b in active:
        row = rows[b]
        T = len(row.drafts) + 1
        out[b, :T] = _shape_row(out[b, :T], row)
    return out


def _prefix_counts(row: ShapeRow, T: int, V: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slot: counts [T, V] of each token in the output before it (drafts on its
    path included), and the depth [T] of the slot (how many drafts precede it)."""
    drafts = torch.tensor(row.drafts, dtype=torch.long, device=device)
    if row.tree is None:  # slot t follows drafts 0..t-1
        on_path = torch.tril(torch.ones(T, T - 1, device=device), diagonal=-1)
        depth = torch.arange(T, device=device)
    else:  # slot i+1 follows node i and its ancestors
        on_path = torch.cat([torch.zeros(1, T - 1, device=device), row.tree.ancestors.to(device).float()])
        depth = torch.cat([torch.zeros(1, dtype=torch.long), row.tree.depth]).to(device)
    generated = torch.tensor(row.committed[row.params.prompt_len :], dtype=torch.long, device=device)
    counts = torch.bincount(generated, minlength=V).float()[None].repeat(T, 1)
    if T > 1:
        counts.index_add_(1, drafts, on_path)  # [T, N] x token ids -> columns
    return counts, depth


def _shape_row(z: torch.Tensor, row: ShapeRow) -> torch.Tensor:
    """z [T, V] float32 -> shaped, every slot with its own prefix."""
    T, V = z.shape
    pen = row.params.penalties
    counts, depth = _prefix_counts(row, T, V, z.device)
    if pen.repetition != 1.0:
        seen = counts > 0
        seen[:, torch.tensor(row.committed, dtype=torch.long, device=z.device)] = True
        z = torch.where(seen, torch.where(z > 0, z / pen.repetition, z * pen.repetition), z)
    if pen.presence or pen.frequency:
        z = z - pen.frequency * counts - pen.presence * (counts > 0).float()
    if pen.logit_bias:
        ids = torch.tensor([i for i, _ in pen.logit_bias], dtype=torch.long, device=z.device)
        z[:, ids] += torch.tensor([v for _, v in pen.logit_bias], device=z.device)
    stop = row.params.stop
    if stop is not None and stop.min_tokens and stop.token_ids:
        produced = len(row.committed) - row.params.prompt_len + depth  # tokens generated before each slot
        early = produced < stop.min_tokens
        ids = torch.tensor(stop.token_ids, dtype=torch.long, device=z.device)
        z[:, ids] = torch.where(early[:, None], float("-inf"), z[:, ids])
    return z


def slot_logprobs(logits: torch.Tensor, params: SamplingParams, tokens: list[int], top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """logits [T, V] (shaped) at the slots that chose ``tokens`` [T] -> each token's
    log-probability under the distribution it was drawn from, and the ``top`` most
    likely tokens of each slot with theirs. A sampled request's distribution is the
    adjusted one (temperature, top-k, top-p); a greedy request's is the shaped logits'
    softmax at temperature 1 (its adjusted distribution is one-hot)."""
    if params.greedy:
        logp = logits.float().log_softmax(-1)
    else:
        rows = SamplingRows.of([params], logits.shape[-1], logits.device)
        logp = adjusted_probs_rows(logits[None], rows)[0].log()
    chosen = logp.gather(-1, torch.tensor(tokens, dtype=torch.long, device=logp.device)[:, None])[:, 0]
    alternatives: list[list[tuple[int, float]]] = [[] for _ in tokens]
    if top:
        values, ids = logp.topk(top, dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return chosen.tolist(), alternatives

"""Logit shaping: penalties, logit bias and min_tokens, applied to the target's and the
draft's logits in the same way, before the standardized sampling map (core/sampling.py).

Every rule depends on the tokens before the position it shapes, and inside a round
that includes the drafts before it: the target's logits at slot t of a chain were
computed after drafts 1..t, and a tree node's after its ancestors and itself. Shaping
each slot with its own prefix makes the verifier's p exactly the shaped target's
distribution at that prefix, so rejection sampling keeps the output distribution the
shaped target's, whatever the drafter did (a drafter that shapes the same way is only
accepted more often).

The rules, in transformers' order (and vLLM's: bias before penalties):
    logit bias: l -> l + bias[token] (transformers' SequenceBiasLogitsProcessor);
    repetition (CTRL, Keskar et al. 2019; transformers' RepetitionPenaltyLogitsProcessor):
        every token in the prompt or the output so far: l -> l / r if l > 0 else l * r;
    presence and frequency (OpenAI's): over the output so far, l -> l - f * count - p * [count > 0];
    min_tokens: the stop ids (EOS included) get -inf while fewer than min_tokens tokens
        have been generated (transformers' MinNewTokensLengthLogitsProcessor).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from .kv import common_prefix_len
from .sampling import SamplingParams, SamplingRows, adjusted_probs_rows
from .tree import TreeShape


class ContextCounts:
    """A sequence's committed tokens, counted: which tokens occur (``cols``, ascending)
    and how often each occurs in the output. Kept on the sequence across rounds, so a
    round counts only its new tokens instead of sorting the whole context again (at a
    4k-token context that was 2 ms a row and round on the host)."""

    def __init__(self):
        self.cols = np.zeros(0, dtype=np.int64)  # [M] every token in prompt + output
        self.output = np.zeros(0, dtype=np.float32)  # [M] its count in the output
        self.upto = 0  # committed tokens counted

    def update(self, committed: list[int], prompt_len: int) -> "ContextCounts":
        if len(committed) < self.upto:  # not a continuation of what was counted: start over
            self.__init__()
        new = np.asarray(committed[self.upto :], dtype=np.int64)
        if len(new):
            cols = merged(self.cols, new)
            output = np.zeros(len(cols), dtype=np.float32)
            output[np.searchsorted(cols, self.cols)] = self.output
            np.add.at(output, np.searchsorted(cols, new[max(prompt_len - self.upto, 0) :]), 1.0)
            self.cols, self.output, self.upto = cols, output, len(committed)
        return self


@dataclass
class CountedContext:
    """A drafter's counts of one context, kept on its proposer state between rounds: the
    next round's context (the committed text grown, or a branch after it) counts only
    what it adds. Sorting a 4,096-token context afresh took 1.3 ms a branch and round."""

    tokens: list[int]  # the context counted (a copy)
    prompt_len: int
    counts: ContextCounts
    # The count this one grew from: a draft after guessed tokens (the bonus guesses)
    # leaves the committed text's count one step back, for the round after a rejection.
    previous: "CountedContext | None" = None

    def prefixes(self, context: list[int], prompt_len: int) -> bool:
        n = len(self.tokens)
        return self.prompt_len == prompt_len and 0 < n <= len(context) and common_prefix_len(self.tokens, context) == n

    @staticmethod
    def of(cached: "CountedContext | None", context: list[int], prompt_len: int) -> "CountedContext":
        """``context`` counted, from ``cached`` (or the count it grew from) where that
        counted a prefix of it."""
        start = next((c for c in (cached, cached and cached.previous) if c is not None and c.prefixes(context, prompt_len)),
                     None)
        # update replaces a ContextCounts' arrays, never writes them: the cached ones stay.
        counts = copy.copy(start.counts) if start is not None else ContextCounts()
        if start is not None and len(start.tokens) == len(context):
            return start
        start = start and CountedContext(start.tokens, start.prompt_len, start.counts)  # one step back, no further
        return CountedContext(list(context), prompt_len, counts.update(context, prompt_len), start)


def merged(cols: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """``cols`` (ascending, unique) with ``extra``'s values added: a few inserts when
    extra is short, not a sort of the whole (numpy's union1d sorts both)."""
    extra = np.unique(extra)
    if not len(cols) or not len(extra):
        return extra if not len(cols) else cols
    at = np.searchsorted(cols, extra)
    missing = (at == len(cols)) | (cols[np.minimum(at, len(cols) - 1)] != extra)
    return np.insert(cols, at[missing], extra[missing]) if missing.any() else cols


@dataclass(frozen=True)
class ShapeRow:
    """One sequence's share of a batch of logits to shape."""

    params: SamplingParams  # penalties, stop rule and prompt_len resolved
    committed: list[int]  # prompt + output so far
    drafts: list[int]  # the round's drafts after committed (slots 1..N shape after them)
    tree: TreeShape | None = None  # the drafts' tree; None = a chain
    counts: ContextCounts | None = None  # the sequence's counts from earlier rounds (None: count afresh)


def shapes(params: SamplingParams) -> bool:
    return params.penalties.active or (params.stop is not None and params.stop.min_tokens > 0 and bool(params.stop.token_ids))


def shape_logits(logits: torch.Tensor, rows: list[ShapeRow | None]) -> torch.Tensor:
    """logits [B, N+1, V] (row b's slot 0 after its committed tokens, slot i+1 after
    draft node i) -> float32 logits with each row's rules applied at each slot, in
    place when ``logits`` are float32 (the callers' logits are theirs to consume: a
    copy of a [B, N+1, V] batch at V = 128k costs more than the shaping). Rows given as
    None, or whose rules are all off, are unchanged.

    Only the columns of the tokens the rules touch change: the prompt and output (for
    the penalties), the drafts, the biased and the stop ids; M of them a row, not V.
    Each row's entries are worked out on the host (small integer work on lists the host
    holds anyway), packed, and cross to the device once; the device then does one
    gather, a few elementwise ops and one scatter for the whole batch, whatever B is.
    """
    active = [b for b, row in enumerate(rows) if row is not None and shapes(row.params)]
    if not active:
        return logits
    out = logits if logits.dtype == torch.float32 else logits.float()
    B, N1, V = out.shape
    parts = [_row_entries(b, rows[b], N1, V) for b in active]
    index = torch.from_numpy(np.concatenate([i for i, _ in parts])).to(out.device)  # [E] flat positions
    bias, rep, sub, mask = torch.from_numpy(np.concatenate([v for _, v in parts], axis=1)).to(out.device)  # [4, E]
    with torch.inference_mode():  # the runner's logits are inference tensors: updated in place only here
        flat = out.view(-1)
        z = flat[index] + bias
        z = torch.where(z > 0, z / rep, z * rep)  # rep is 1 where the token was not seen
        z = (z - sub).masked_fill(mask > 0, float("-inf"))
        flat[index] = z
    return out


def _row_entries(b: int, row: ShapeRow, N1: int, V: int) -> tuple[np.ndarray, np.ndarray]:
    """Row b's entries: flat positions [T*M] in the [B, N1, V] logits, and per entry
    [4, T*M] float32: (bias to add, repetition divisor, presence + frequency to
    subtract, 1 to mask out)."""
    T = len(row.drafts) + 1
    pen, stop = row.params.penalties, row.params.stop
    penalizes = pen.counts_context
    masks = stop is not None and stop.min_tokens > 0 and bool(stop.token_ids)
    seen = (row.counts or ContextCounts()).update(row.committed, row.params.prompt_len) if penalizes else ContextCounts()
    drafts = np.asarray(row.drafts if penalizes else (), dtype=np.int64)
    bias_ids = np.asarray([t for t, _ in pen.logit_bias], dtype=np.int64)
    stop_ids = np.asarray(stop.token_ids if masks else (), dtype=np.int64)
    cols = merged(seen.cols, np.concatenate([drafts, bias_ids, stop_ids]))  # [M] ascending
    M = len(cols)
    values = np.zeros((4, T, M), dtype=np.float32)
    values[1] = 1.0
    if penalizes:
        at = np.searchsorted(cols, seen.cols)
        counts = np.zeros((T, M), dtype=np.float32)
        counts[:, at] = seen.output
        if T > 1:  # the drafts on each slot's path count as output there
            if row.tree is None:  # slot t follows drafts 0..t-1
                slots, nodes = np.tril_indices(T, -1)
            else:  # slot i+1 follows node i and its ancestors
                slots, nodes = np.nonzero(row.tree.ancestors.cpu().numpy())
                slots = slots + 1
            np.add.at(counts, (slots, np.searchsorted(cols, drafts)[nodes]), 1.0)
        in_context = np.zeros(M, dtype=bool)
        in_context[at] = True
        values[1] = np.where(in_context | (counts > 0), pen.repetition, 1.0)
        values[2] = pen.frequency * counts + pen.presence * (counts > 0)
    if pen.logit_bias:
        values[0][:, np.searchsorted(cols, bias_ids)] = [v for _, v in pen.logit_bias]
    if masks:
        depth = np.arange(T) if row.tree is None else np.concatenate([[0], row.tree.depth.cpu().numpy()])
        produced = len(row.committed) - row.params.prompt_len + depth  # tokens generated before each slot
        early = np.flatnonzero(produced < stop.min_tokens)
        values[3][early[:, None], np.searchsorted(cols, stop_ids)[None]] = 1.0
    index = ((b * N1 + np.arange(T))[:, None] * V + cols[None]).reshape(-1)
    return index, values.reshape(4, -1)


class StepShaper:
    """One sequence's rules for a drafter that shapes one slot a step and then appends
    the token it drew: the same logits as ``shape_logits`` gives that slot, from a few
    small tensor ops on indices kept on the device, instead of working the entries out
    on the host again every step. On the bundled pair that host work was about 0.25 ms
    a draft step, a sixth of the step, and it made drafting with a repetition penalty
    27% slower per round (measured in-process, `--repetition-penalty 1.1`)."""

    def __init__(self, params: SamplingParams, committed: list[int], device: torch.device | str,
                 counts: ContextCounts | None = None):
        """``counts``: ``committed`` counted already (read, never changed)."""
        pen, stop = params.penalties, params.stop
        self.params, self.device = params, device
        self.repetition = pen.repetition
        self.subtracts = bool(pen.presence) or bool(pen.frequency)
        penalizes = pen.counts_context
        if not penalizes:
            counts = ContextCounts()
        elif counts is None:
            counts = ContextCounts().update(committed, params.prompt_len)
        # A token's index in ``seen``: by bisection in the counted (ascending) tokens, and
        # through ``added`` for those the draft adds (a dict of all M took 0.4 ms at 4k).
        self.counted = counts.cols
        self.added: dict[int, int] = {}
        self.seen = torch.from_numpy(counts.cols).to(device)  # [M] every token of prompt + output
        self.output = counts.output.copy()  # [M] host counts, for the subtrahends
        self.sub = self._subtrahends() if self.subtracts else None  # [M] device
        self.penalizes = penalizes
        self.bias_ids = torch.tensor([t for t, _ in pen.logit_bias], dtype=torch.long, device=device)
        self.bias = torch.tensor([v for _, v in pen.logit_bias], dtype=torch.float32, device=device)
        masks = stop is not None and stop.min_tokens > 0 and bool(stop.token_ids)
        self.stop_ids = torch.tensor(stop.token_ids if masks else (), dtype=torch.long, device=device)
        self.produced = len(committed) - params.prompt_len  # tokens generated before the next slot
        self.min_tokens = stop.min_tokens if masks else 0

    def _subtrahends(self) -> torch.Tensor:
        # Worked out as _row_entries does (numpy, float64 then float32): the same values.
        pen = self.params.penalties
        sub = np.zeros(len(self.output), dtype=np.float32)
        sub[:] = pen.frequency * self.output + pen.presence * (self.output > 0)
        return torch.from_numpy(sub).to(self.device)

    @torch.inference_mode()  # the runner's logits are inference tensors: updated in place only here
    def apply(self, row: torch.Tensor) -> torch.Tensor:
        """row [V] -> the shaped float32 row (in place when it is float32)."""
        z = row if row.dtype == torch.float32 else row.float()
        if len(self.bias_ids):
            z[self.bias_ids] = z[self.bias_ids] + self.bias
        if self.penalizes and len(self.seen):  # one gather and one scatter for both penalties
            v = z[self.seen]
            if self.repetition != 1.0:
                v = torch.where(v > 0, v / self.repetition, v * self.repetition)
            if self.sub is not None:
                v = v - self.sub
            z[self.seen] = v
        if self.produced < self.min_tokens:
            z[self.stop_ids] = float("-inf")
        return z

    def append(self, token: int) -> None:
        """The slot's token joins the output: the next slot follows it."""
        self.produced += 1
        if not self.penalizes:
            return
        at = int(np.searchsorted(self.counted, token))
        if at == len(self.counted) or self.counted[at] != token:
            at = self.added.get(token)
        if at is None:
            self.added[token] = at = len(self.output)
            self.seen = torch.cat([self.seen, torch.tensor([token], dtype=torch.long, device=self.device)])
            self.output = np.append(self.output, np.float32(0))
            if self.sub is not None:
                self.sub = torch.cat([self.sub, self.sub.new_zeros(1)])
        self.output[at] += 1
        if self.sub is not None:  # one subtrahend changes, worked out as above
            pen = self.params.penalties
            self.sub[at] = float(np.float32(pen.frequency * self.output[at] + pen.presence * (self.output[at] > 0)))


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

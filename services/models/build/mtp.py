"""The MTP side of ``outrider build-heads --kind mtp`` (stages as in build/heads.py).

Training: windows of the target's own continuations, teacher-forced through every
drafting depth (depths past the trained modules reuse the last, so it learns that
role too): depth k at position j learns the target's distribution of x_{j+k+2},
KL(p_target || p_k), weighted 0.8^k, with gradients flowing down the chain of depths
as in DeepSeek-V3. The target stays frozen; its embedding and LM head are shared.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ..mtp import MtpHeads
from .train import distill_heads


def train_mtp(cfg, heads: MtpHeads, target, hidden: torch.Tensor, seqs: np.ndarray) -> None:
    lm_head = target.get_output_embeddings()
    D, (n, T, _) = cfg.depths, hidden.shape
    W = min(cfg.window, T)
    batch = max(1, cfg.positions // W)
    tokens_all = torch.from_numpy(seqs)

    def kl_at(gen: torch.Generator) -> torch.Tensor:
        rows = torch.randint(0, n, (batch,), generator=gen)
        starts = torch.randint(0, T - W + 1, (batch,), generator=gen)
        cols = starts[:, None] + torch.arange(W)
        h0 = hidden[rows[:, None], cols].float().to(cfg.device)  # [B, W, H]
        tokens = tokens_all[rows[:, None], cols].to(cfg.device)  # [B, W]
        kls = []
        for k, logits in enumerate(heads.forward_train(h0, tokens, D)):  # [B, W-k-1, V] predicting x_{j+k+2}
            with torch.no_grad():
                teacher = F.log_softmax(lm_head(h0[:, k + 1 : k + 1 + logits.shape[1]]).float(), -1)
            kls.append(F.kl_div(F.log_softmax(logits.float(), -1), teacher, log_target=True,
                                reduction="none").sum(-1).mean())
        return torch.stack(kls)

    distill_heads(cfg, heads, "mtp", D, kl_at)


@torch.no_grad()
def mtp_truth_ranks(heads: MtpHeads, depths: int, hidden: torch.Tensor, seqs: np.ndarray, start: int, device: str,
                    max_rank: int = 16) -> np.ndarray:
    """[positions, depths]: where x_{j+k+2} ranks among depth k's candidates at j,
    teacher-forced on the target's greedy text, which is exactly what a drafted chain
    sees while its tokens are accepted (so choose_tree's path counting holds)."""
    rows = []
    for b in range(len(seqs)):
        tokens = torch.from_numpy(seqs[b])[None].to(device)
        logits = heads.forward_train(hidden[b : b + 1].float().to(device), tokens, depths)
        T = tokens.shape[1]
        cols = torch.arange(start - 1, T - depths - 1)
        ranks = []
        for k in range(depths):
            top = heads.candidates(logits[k][0, cols], max_rank).cpu()  # [L, R] token ids
            truth = tokens[0, cols + k + 2].cpu()
            hit = top == truth[:, None]
            ranks.append(torch.where(hit.any(-1), hit.int().argmax(-1), max_rank))
        rows.append(torch.stack(ranks, -1).numpy())
    return np.concatenate(rows)


def mtp_draft_s(heads: MtpHeads, depths: int, context: int, device: str, repeats: int = 9) -> float:
    """The time of one round's drafting on this device: every depth over two new
    positions after ``context`` cached ones (a typical accepted length)."""
    H = heads.config.hidden_size
    dtype = heads.dtype
    caches = [heads.new_cache() for _ in range(depths)]
    with torch.inference_mode():
        for k in range(depths):
            heads.run_depth(k, torch.zeros(context, H, dtype=dtype, device=device),
                            torch.full((context,), 5, device=device), 0, caches[k])
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for k in range(depths):
                out = heads.run_depth(k, torch.zeros(2, H, dtype=dtype, device=device),
                                      torch.full((2,), 5, device=device), context, caches[k])
                heads.logits(k, out[-1]).argmax().item()
                heads.truncate(caches[k], context)
            samples.append(time.perf_counter() - t0)
    return float(np.median(samples))

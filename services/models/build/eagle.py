"""The EAGLE-3 side of ``outrider build-heads --kind eagle`` (stages as in build/heads.py):
training, then the tree (depth, top_k, nodes) measured fastest on this device.

Training-time test (EAGLE-3): windows of the target's own continuations (self-
distilled: what the drafter must predict when serving), unrolled ``depths`` steps.
Step 0 reads the target's fused features; each later step reads the drafter's own
features from the step before, with attention as drafting has it
(models/eagle.py ``forward_train``). Step s at anchor j learns the target's
distribution of x_{j+s+2} over the draft vocabulary, KL(p_target || q), weighted
0.8^s; the target stays frozen, its embedding shared.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ...core.eagle_proposer import EagleProposer, EagleTree
from ...core.engine import SpeculativeEngine
from ...core.gamma import MAX_GAMMA, GammaSchedule
from ...core.stats import GenerationStats
from ...core.target import TargetRunner
from ...core.verifier import TargetVerifier
from ..eagle import Eagle3Drafter
from ..loading import max_context
from .train import distill_heads


@torch.no_grad()
def layer_states(cfg, target, seqs: np.ndarray, name: str, layers: tuple[int, ...]) -> torch.Tensor:
    """[n, T, len(layers) * H] float16: the states entering ``layers`` at every position."""
    out = cfg.work_dir / f"{name}_features.{'-'.join(map(str, layers))}.pt"
    if out.exists():
        return torch.load(out)
    parts = []
    for b in tqdm(range(0, len(seqs), 16), desc=f"features ({name})", dynamic_ncols=True):
        states = target(input_ids=torch.from_numpy(seqs[b : b + 16]).to(cfg.device), output_hidden_states=True,
                        logits_to_keep=1).hidden_states  # [0] the embeddings, [i] entering layer i
        parts.append(torch.cat([states[i] for i in layers], -1).half().cpu())
    features = torch.cat(parts)
    torch.save(features, out)
    return features


def train_eagle(cfg, drafter: Eagle3Drafter, target, features: torch.Tensor, hidden: torch.Tensor,
                seqs: np.ndarray) -> None:
    """``features`` [n, T, 3H] (layer_states), ``hidden`` [n, T, H] the target's final
    states (the teacher: its LM head at position j+s+1 gives x_{j+s+2})."""
    steps, (n, T, _) = cfg.depths, features.shape
    W = min(cfg.window, T - steps - 1)
    batch = max(1, cfg.positions // W)
    tokens_all = torch.from_numpy(seqs)
    head = target.get_output_embeddings().weight
    rows_of = drafter.draft_vocab if drafter.draft_vocab is not None else torch.arange(len(head))
    teacher_head = head[rows_of.to(head.device)].float()  # [K, H]: the target over the draft vocabulary

    def kl_at(gen: torch.Generator) -> torch.Tensor:
        rows = torch.randint(0, n, (batch,), generator=gen)
        starts = torch.randint(0, T - W - steps, (batch,), generator=gen)
        cols = starts[:, None] + torch.arange(W)
        feats = features[rows[:, None], cols].float().to(cfg.device)  # [B, W, 3H]
        tokens = tokens_all[rows[:, None], starts[:, None] + torch.arange(W + steps + 1)].to(cfg.device)
        kls = []
        for s, logits in enumerate(drafter.forward_train(feats, tokens, steps)):  # [B, W, K] -> x_{j+s+2}
            with torch.no_grad():
                h = hidden[rows[:, None], cols + s + 1].float().to(cfg.device)
                teacher = F.log_softmax(h @ teacher_head.T, -1)
            kls.append(F.kl_div(F.log_softmax(logits.float(), -1), teacher, log_target=True,
                                reduction="none").sum(-1).mean())
        return torch.stack(kls)

    distill_heads(cfg, drafter, "eagle", steps, kl_at)


@torch.no_grad()
def eagle_truth_ranks(drafter: Eagle3Drafter, depths: int, features: torch.Tensor, seqs: np.ndarray, start: int,
                      device: str, max_rank: int = 16) -> np.ndarray:
    """[positions, depths]: where x_{j+s+2} ranks among step s's candidates at anchor j,
    teacher-forced on the target's greedy text (what a chain sees while accepted)."""
    rows = []
    for b in range(len(seqs)):
        T = features.shape[1] - depths - 1
        tokens = torch.from_numpy(seqs[b])[None].to(device)
        logits = drafter.forward_train(features[b : b + 1, :T].float().to(device), tokens, depths)
        cols = torch.arange(start - 1, T)
        ranks = []
        for s in range(depths):
            top = drafter.candidates(logits[s][0, cols], max_rank).cpu()
            hit = top == tokens[0, cols + s + 2].cpu()[:, None]
            ranks.append(torch.where(hit.any(-1), hit.int().argmax(-1), max_rank))
        rows.append(torch.stack(ranks, -1).numpy())
    return np.concatenate(rows)


# Trees ``tune_tree`` measures: chains, and EAGLE-2 trees of a few widths.
EAGLE_TREES = tuple(EagleTree(d, 1, d) for d in (2, 3, 4, 5, 6)) + tuple(
    EagleTree(d, k, n) for d in (4, 5, 6) for k, n in ((2, 8), (3, 12)))


@torch.inference_mode()
def tune_tree(drafter: Eagle3Drafter, target, prompts: list[list[int]], max_new: int, repeats: int = 3,
              trees: tuple[EagleTree, ...] = EAGLE_TREES) -> tuple[EagleTree, dict]:
    """The tree that decodes ``prompts`` (greedy) fastest on this device, measured, not
    modelled: each pass times target-only decoding and every tree, interleaved, so
    that drift in machine load hits them alike; a tree's figure is its median speedup
    over the passes. Returns it and {label: (median speedup, mean accepted length)}."""
    runner = TargetRunner(target, kv_cache_bytes=2**28)
    limit = max_context(target)

    def timed(proposer) -> tuple[float, float]:
        engine = SpeculativeEngine(TargetVerifier(runner), proposer, None, limit, GammaSchedule(initial=MAX_GAMMA))
        emitted, seconds, stats = 0, 0.0, GenerationStats()
        for ids in prompts:
            t0 = time.perf_counter()
            result = engine.generate(ids, max_new)
            seconds += time.perf_counter() - t0
            emitted += len(result.token_ids)
            stats += result.stats
        return emitted / seconds, stats.mean_acceptance_length

    speedups = {tree: [] for tree in trees}
    accepted = {}
    for _ in tqdm(range(repeats), desc="eagle trees", dynamic_ncols=True):
        plain, _ = timed(None)
        for tree in trees:
            rate, accepted[tree] = timed(EagleProposer(drafter, tree, target.device))
            speedups[tree].append(rate / plain)
    median = {tree: float(np.median(s)) for tree, s in speedups.items()}
    best = max(trees, key=lambda tree: median[tree])
    return best, {tree.label: (median[tree], float(accepted[tree])) for tree in trees}

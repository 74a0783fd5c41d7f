"""The tree acceptor reproduces the target's adjusted distribution at every depth, for
sampled, deterministic (top-k) and mixed siblings, and walks chains exactly as the
chain sampler does.

As in test_rejection.py, every row of one big batch is an independent trial of one
round whose targets depend only on depth (p_d after any node at depth d, p_0 at the
root), so the token a row emits at depth j, among rows whose path reaches j, must follow
p_j. Conditioned on reaching a node, its children are fresh independent draws (or fixed
candidates), so the claim holds node by node. Each test also checks that the test at its
own n rejects a 3% bias (tests/distribution.py).
"""

import numpy as np
import pytest
import torch
from distribution import ALPHA, chi2_pvalue, has_power

from services.core.draft_q import SparseQ, compact
from services.core.rejection import DraftBatch, Randomness, accept_batch
from services.core.sampling import SamplingParams, SamplingRows, adjusted_probs
from services.core.tree import tree_shape
from services.core.tree_accept import TreeBatch, accept_tree_batch

CONFIGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=0.7, top_p=0.8),
    SamplingParams(temperature=1.0, top_k=6, top_p=0.9),
    SamplingParams(),  # greedy rows in the same pass
]
WIDE = (-1, -1, -1, -1)  # four siblings, depth 1
DEEP = (-1, -1, -1, 0, 0, 1, 3, 3)  # 3, 2 and 1 siblings per node, depth 3
ROWS = 120_000
V = 8


def _logits(seed: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed))


def _tree_round(parents, kind, seed=0):
    shape = tree_shape(parents)
    N, D = len(parents), shape.max_depth
    depth, rank = shape.depth, shape.sibling_rank
    target_logits = _logits(seed, D + 1)  # p_d: after the root (d = 0) or any node at depth d
    draft_logits = target_logits[:D] + 0.8 * _logits(seed + 1, D)  # q for nodes at depth d + 1
    params = [CONFIGS[r % len(CONFIGS)] for r in range(ROWS * len(CONFIGS))]
    B = len(params)
    gen = torch.Generator().manual_seed(seed + 2)
    tokens = torch.zeros(B, N, dtype=torch.long)
    q_ids, q_probs, q_tail = torch.zeros(B, N, V, dtype=torch.long), torch.zeros(B, N, V), torch.zeros(B, N)
    for c, cfg in enumerate(CONFIGS):
        idx = torch.arange(c, B, len(CONFIGS))
        for i in range(N):
            d = int(depth[i]) - 1
            fixed = kind in ("deterministic", "unlikely") or (kind == "mixed" and rank[i] % 2 == 0) or cfg.greedy
            if fixed:  # a head's rank-th candidate, or (unlikely) the rank-th least likely token
                order = target_logits[d].argsort() if kind == "unlikely" else draft_logits[d].argsort(descending=True)
                tokens[idx, i] = order[rank[i]]
                q_ids[idx, i, 0], q_probs[idx, i, 0] = order[rank[i]], 1.0
                continue
            q = compact(adjusted_probs(draft_logits[d], cfg), max_support=5)
            tokens[idx, i] = torch.multinomial(q.dense(), len(idx), replacement=True, generator=gen)
            K = q.ids.shape[-1]
            q_ids[idx, i, :K], q_probs[idx, i, :K], q_tail[idx, i] = q.ids, q.probs, q.tail
    batch = DraftBatch(tokens, torch.full((B,), N), q_ids, q_probs, q_tail)
    logits = target_logits[torch.cat([torch.zeros(1, dtype=torch.long), depth])].expand(B, N + 1, V)
    rand = Randomness(uniforms=torch.rand(B, N, generator=gen), final=torch.rand(B, generator=gen))
    out = accept_tree_batch(logits, batch, TreeBatch.of([shape] * B, [N] * B, "cpu"), SamplingRows.of(params, V, "cpu"), rand)
    return out.numpy(), tokens.numpy(), target_logits, shape


@pytest.mark.parametrize("parents,kind", [
    (WIDE, "sampled"), (WIDE, "deterministic"), (WIDE, "unlikely"),
    (DEEP, "sampled"), (DEEP, "deterministic"), (DEEP, "mixed"),
])
def test_every_depth_follows_the_target(parents, kind):
    deepest = check_tree_round(parents, kind)
    if parents == DEEP and kind == "sampled":  # (fixed candidates rarely get two levels deep here)
        assert max(deepest.values()) >= 2, deepest


def check_tree_round(parents, kind) -> dict:
    """Runs the checks; returns the deepest depth tested per sampled config."""
    out, tokens, target_logits, shape = _tree_round(parents, kind)
    D = shape.max_depth
    rng = np.random.default_rng(0)
    deepest = {}
    for c, cfg in enumerate(CONFIGS):
        rows = np.arange(c, len(out), len(CONFIGS))
        n, final, path = out[rows, 0], out[rows, 1], out[rows, 2:]
        if cfg.greedy:
            best = target_logits.argmax(-1).numpy()
            for b in range(0, len(rows), 997):  # the longest all-argmax path, then the argmax
                node, want = -1, 0
                while True:
                    kids = [k for k in shape.children[node + 1].tolist() if k >= 0 and tokens[rows[b], k] == best[want]]
                    if not kids:
                        break
                    node, want = kids[0], want + 1
                assert n[b] == want and final[b] == best[want]
            continue
        p = adjusted_probs(target_logits, cfg).numpy()  # [D+1, V]
        if kind == "unlikely":
            all_rejected = (n == 0).mean()
            assert all_rejected > 0.5, f"{cfg}: every sibling rejected in only {all_rejected:.0%} of rows"
        tested = []
        for j in range(D + 1):
            reached = n >= j
            if not has_power(int(reached.sum()), p[j], rng):
                continue  # too few rows reach this depth to see a 3% bias
            on_path = path[reached, min(j, D - 1)]
            emitted = np.where(n[reached] > j, tokens[rows][reached, np.maximum(on_path, 0)], final[reached])
            assert chi2_pvalue(emitted, p[j]) > ALPHA, f"{cfg}: depth {j}"
            tested.append(j)
        # The root always; below it wherever rows get there (not past a wall of unlikely candidates).
        assert tested[:1] == [0] and (kind == "unlikely" or 1 in tested), f"{cfg}: tested depths {tested}"
        deepest[cfg] = max(tested)
    return deepest




def test_a_chain_walks_exactly_as_the_chain_sampler():
    """Same draws, same batch: the tree walk of chains equals accept_batch bit for bit."""
    g = torch.Generator().manual_seed(5)
    sizes = [3, 0, 5, 5, 1, 4]
    params = [SamplingParams(temperature=t, top_k=k) for t, k in [(1.0, 0), (0.0, 0), (0.7, 5), (0.0, 0), (1.0, 3), (0.9, 0)]]
    Vb = 50
    logits = torch.randn(len(sizes), 6, Vb, generator=g) * 2
    drafts = []
    for n, cfg in zip(sizes, params):
        if cfg.greedy or n == 0:
            drafts.append((logits[len(drafts), :n].argmax(-1), None))
            continue
        q = SparseQ.stack([compact(adjusted_probs(logits[len(drafts), j] + torch.randn(Vb, generator=g), cfg)) for j in range(n)])
        drafts.append((torch.multinomial(q.dense(), 1, generator=g)[:, 0], q))
    batch = DraftBatch.of(drafts, Vb, "cpu")
    rows = SamplingRows.of(params, Vb, "cpu")
    for seed in range(20):
        rand = Randomness.draw([None if p.greedy else (seed, 0) for p in params], sizes, 5, "cpu")
        chain = accept_batch(logits, batch, rows, rand)
        tree = accept_tree_batch(logits, batch, TreeBatch.of([None] * len(sizes), sizes, "cpu"), rows, rand)
        assert torch.equal(tree[:, :2], chain)
        for row, n in zip(tree.tolist(), chain[:, 0].tolist()):
            assert row[2 : 2 + n] == list(range(n))

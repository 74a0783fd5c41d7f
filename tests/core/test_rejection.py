"""The batched rejection sampler reproduces the target's adjusted distribution exactly,
at every draft position and at the bonus position, with greedy, sampled and one-hot-q
rows mixed in one batch.

Each row of one big batch is an independent trial of one round, with targets p_j and
drafts q_j that depend only on the block position j (prefix-independent), so the
token a row emits at position j, among the rows that reach j, must follow p_j.

Every tested position also checks, at its own n, that the test would catch a 3% bias
(tests/distribution.py).
"""

import numpy as np
import pytest
import torch
from distribution import ALPHA, check_power, chi2_pvalue

from services.core.draft_q import SparseQ, compact
from services.core.rejection import DraftBatch, Randomness, accept_batch, accept_greedy_chains
from services.core.sampling import SamplingParams, SamplingRows, adjusted_probs

V = 8
G = 3
CONFIGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.7, top_p=0.8),
    SamplingParams(temperature=1.0, top_k=6, top_p=0.9),
]
ROWS = 250_000  # per config; the bonus position is reached by about half of them


def _logits(seed: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed))


def _round(configs, rows_per_config, one_hot_q=False, seed=0):
    """One round for every row; row r uses configs[r % len(configs)]."""
    params = [configs[r % len(configs)] for r in range(rows_per_config * len(configs))]
    B = len(params)
    target_logits = _logits(seed, G + 1)  # [G+1, V], the same for every row
    # A draft close to the target (most rows reach the bonus position) but not equal
    # to it (corrections at every position).
    draft_logits = target_logits[:G] + 0.8 * _logits(seed + 1, G)
    gen = torch.Generator().manual_seed(seed + 2)
    drafts = torch.zeros(B, G, dtype=torch.long)
    q_ids = torch.zeros(B, G, V, dtype=torch.long)
    q_probs = torch.zeros(B, G, V)
    q_tail = torch.zeros(B, G)
    for c, cfg in enumerate(configs):
        idx = torch.arange(c, B, len(configs))
        if cfg.greedy or one_hot_q:  # deterministic drafts, one-hot q
            # greedy rows: the draft's argmax; one-hot-q sampled rows: the target's (an
            # n-gram-like guess that is often right)
            guesses = (draft_logits if cfg.greedy else target_logits[:G]).argmax(-1).expand(len(idx), G)
            drafts[idx] = guesses
            q_ids[idx, :, 0], q_probs[idx, :, 0] = guesses, 1.0
            continue
        # The compact q' drafters send; a support of 5 leaves a tail bucket of 3 tokens
        # when nothing truncates q (the tail path of the sampler runs too).
        q = SparseQ.stack([compact(adjusted_probs(draft_logits[j], cfg), max_support=5) for j in range(G)])  # [G, K]
        dense = q.dense()  # [G, V]
        for j in range(G):
            drafts[idx, j] = torch.multinomial(dense[j], len(idx), replacement=True, generator=gen)
        K = q.ids.shape[-1]
        q_ids[idx, :, :K], q_probs[idx, :, :K], q_tail[idx] = q.ids, q.probs, q.tail
    batch = DraftBatch(drafts, torch.full((B,), G), q_ids, q_probs, q_tail)
    sampling = SamplingRows.of(params, V, "cpu")
    rand = Randomness(uniforms=torch.rand(B, G, generator=gen), final=torch.rand(B, generator=gen))
    out = accept_batch(target_logits.expand(B, G + 1, V), batch, sampling, rand)
    return out.numpy(), drafts.numpy(), target_logits


@pytest.mark.parametrize("one_hot_q", [False, True], ids=["sampled-q", "one-hot-q"])
def test_every_position_follows_the_target(one_hot_q):
    # Greedy rows share the batch. One-hot q (n-gram guesses) accepts less often, so
    # fewer configs with more rows each reach the bonus position often enough.
    configs = ([CONFIGS[0], CONFIGS[3]] if one_hot_q else CONFIGS) + [SamplingParams()]
    out, drafts, target_logits = _round(configs, 3 * ROWS if one_hot_q else ROWS, one_hot_q)
    rng = np.random.default_rng(0)
    for c, cfg in enumerate(configs):
        rows = np.arange(c, len(out), len(configs))
        n, token = out[rows, 0], out[rows, 1]
        if cfg.greedy:
            best = target_logits.argmax(-1).numpy()
            agree = np.cumprod(drafts[rows] == best[:G], axis=1).sum(1)
            assert (n == agree).all() and (token == best[n]).all()
            continue
        p = adjusted_probs(target_logits, cfg).numpy()  # [G+1, V]
        for j in range(G + 1):
            reached = n >= j
            # The token emitted at position j: the accepted draft, or the correction /
            # bonus when n == j.
            emitted = np.where(n[reached] > j, drafts[rows][reached, min(j, G - 1)], token[reached])
            assert reached.sum() > 10_000, f"{cfg}: position {j} reached by {reached.sum()} rows only"
            assert chi2_pvalue(emitted, p[j]) > ALPHA, f"{cfg}: position {j}"
            check_power(int(reached.sum()), p[j], rng)


def test_lying_about_q_is_caught():
    """Testing against q without the same top-k adjustment as p is the vLLM #10198
    bug; the same statistical test must see it."""
    cfg = SamplingParams(temperature=1.0, top_k=3)
    B = 60_000
    target_logits, draft_logits = _logits(21, 2), _logits(22, 1)
    gen = torch.Generator().manual_seed(0)
    q_raw = draft_logits[0].softmax(-1)
    drafts = torch.multinomial(q_raw, B, replacement=True, generator=gen)[:, None]
    q_claimed = compact(adjusted_probs(draft_logits[0], cfg))  # not what was sampled from
    K = q_claimed.ids.shape[-1]
    batch = DraftBatch(drafts, torch.ones(B, dtype=torch.long), q_claimed.ids.expand(B, 1, K),
                       q_claimed.probs.expand(B, 1, K), q_claimed.tail.expand(B, 1))
    rand = Randomness(torch.rand(B, 1, generator=gen), torch.rand(B, generator=gen))
    out = accept_batch(target_logits.expand(B, 2, V), batch, SamplingRows.of([cfg] * B, V, "cpu"), rand).numpy()
    first = np.where(out[:, 0] > 0, drafts[:, 0].numpy(), out[:, 1])
    assert chi2_pvalue(first, adjusted_probs(target_logits[0], cfg).numpy()) < ALPHA


def test_greedy_accepts_matching_prefix_then_corrects():
    logits = torch.full((4, V), -10.0)
    for i, b in enumerate([2, 5, 1, 7]):
        logits[i, b] = 10.0
    cases = [([2, 5, 1], (3, 7)), ([2, 4, 1], (1, 5)), ([3], (0, 2)), ([], (0, 2))]
    batch = DraftBatch.of([(torch.tensor(d, dtype=torch.long), None) for d, _ in cases], V, "cpu")
    rows = SamplingRows.of([SamplingParams()] * len(cases), V, "cpu")
    rand = Randomness(torch.ones(len(cases), 3), torch.zeros(len(cases)))
    out = accept_batch(logits.expand(len(cases), 4, V), batch, rows, rand)
    assert out.tolist() == [list(want) for _, want in cases]


def test_an_all_greedy_batch_takes_the_argmax_path_with_the_same_outcomes():
    """accept_greedy_chains is accept_batch's greedy rule: ragged rows, drafts that
    match the argmax for a while and then miss, rows that match all the way."""
    gen = torch.Generator().manual_seed(3)
    B, G1, vocab = 64, 6, 50
    logits = torch.randn(B, G1, vocab, generator=gen)
    best = logits.argmax(-1)
    drafts = []
    for b in range(B):
        g = b % G1  # 0..5 drafts
        row = best[b, :g].clone()
        miss = int(torch.randint(0, g + 1, (1,), generator=gen))  # g: no miss
        if miss < g:
            row[miss] = (row[miss] + 1) % vocab
        drafts.append(row)
    batch = DraftBatch.of([(d, None) for d in drafts], vocab, "cpu")
    rows = SamplingRows.of([SamplingParams()] * B, vocab, "cpu")
    rand = Randomness(torch.ones(B, G1 - 1), torch.zeros(B))
    expected = accept_batch(logits, batch, rows, rand).tolist()
    got = accept_greedy_chains(logits, drafts)
    assert [[n, tokens[-1]] for n, tokens in got] == expected
    assert all(tokens[:-1] == d[:n].tolist() for (n, tokens), d in zip(got, drafts))
    assert {n for n, _ in got} == set(range(G1))  # every accepted count occurs


def _dense_q(drafts: DraftBatch, at: torch.Tensor, vocab: int) -> torch.Tensor:
    """q' of draft at[b] of every row b over the whole vocabulary, [B, V]: the tail
    everywhere, the support's own values on it."""
    ar = torch.arange(at.shape[0])
    dense = drafts.q_tail[ar, at][:, None].expand(-1, vocab).clone()
    support = drafts.q_probs[ar, at] > 0
    for b in range(at.shape[0]):
        dense[b, drafts.q_ids[b, at[b]][support[b]]] = drafts.q_probs[b, at[b]][support[b]]
    return dense


def test_the_sparse_residual_equals_the_dense_one():
    """DraftBatch.residual_ (the tail off every token, then the K support entries) is
    max(0, p - s q') with q' dense, and p where s = 0; DraftBatch.q_at is q' at a token.
    Rows are padded to the widest support, with token 0 both a real support token and
    the padding id."""
    gen = torch.Generator().manual_seed(5)
    vocab, G = 50, 3
    rows = [(torch.tensor([0, 0, 0]), None), (torch.tensor([4], dtype=torch.long), None)]
    for width in (2, 5, 9):
        logits = torch.randn(G, vocab, generator=gen) * 3
        logits[:, 0] += 6  # token 0 in every support
        q = SparseQ.stack([compact(logits[j].softmax(-1), max_support=width) for j in range(G)])
        rows.append((torch.randint(0, vocab, (G,), generator=gen), q))
    drafts = DraftBatch.of(rows, vocab, "cpu")
    B = len(rows)
    for _ in range(20):
        at = torch.randint(0, G, (B,), generator=gen).clamp(max=drafts.num_drafts - 1)
        rejected = torch.rand(B, generator=gen) < 0.7
        p = torch.rand(B, vocab, generator=gen)
        scale = rejected * torch.rand(B, generator=gen) * 2  # the tree walk scales q' by the residual's mass
        dense = _dense_q(drafts, at, vocab)
        expected = (p - dense * scale[:, None]).clamp_min(0)
        torch.testing.assert_close(drafts.residual_(p.clone(), at, scale), expected, rtol=0, atol=1e-6)
        tokens = torch.randint(0, vocab, (B,), generator=gen)
        torch.testing.assert_close(drafts.q_at(at, tokens), dense[torch.arange(B), tokens])


def test_keyed_draws_depend_on_the_row_alone():
    """A row's draws are the same whatever batch it is in, and differ by round."""
    alone = Randomness.draw([(7, 3)], [2], 2, "cpu")
    mixed = Randomness.draw([None, (9, 0), (7, 3)], [4, 4, 2], 4, "cpu")
    assert torch.equal(alone.uniforms[0], mixed.uniforms[2, :2])
    assert torch.equal(alone.final[0], mixed.final[2])
    next_round = Randomness.draw([(7, 4)], [2], 2, "cpu")
    assert not torch.equal(alone.uniforms[0], next_round.uniforms[0])

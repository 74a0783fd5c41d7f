"""A draft model's paged KV: every state's logits equal a plain forward over its tokens,
through batched steps, rollbacks and forks that share blocks; a block is copied only
when a holder writes it; dropped states give their blocks back; a pool that cannot
hold a step refuses it having changed nothing."""

import gc

import pytest
import torch
from tiny_models import plain_logits as plain, tiny

from services.core.errors import PoolExhausted
from services.core.kv_pool import BLOCK_TOKENS, KVPool, kv_bytes_per_token
from services.core.paged_kv import PagedKV, extend_paged
from services.core.proposers import DraftModelProposer
from services.core.sampling import SamplingParams


def pool_of(model, blocks: int) -> KVPool:
    return KVPool.for_model(model, blocks * BLOCK_TOKENS * kv_bytes_per_token(model.config, model.dtype))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "mistral"])
def test_forks_and_rollbacks_equal_a_plain_forward(family):
    model = tiny(family, seed=0)
    pool = pool_of(model, 64)
    tokens = torch.randint(3, 90, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    a = PagedKV(pool)
    first, second = extend_paged(model, [a], [tokens[:37]], [37]), extend_paged(model, [a], [tokens[37:]], [33])
    torch.testing.assert_close(torch.cat(first + second), plain(model, tokens), rtol=1e-5, atol=1e-5)
    b, c = a.fork(40), a.fork(23)  # mid-block forks share a's first 3 and 2 blocks
    assert b.blocks == a.blocks[:3] and c.blocks == a.blocks[:2]
    assert [pool.refs[block] for block in a.blocks] == [3, 3, 2, 1, 1]
    a.truncate(45)  # a rejected draft: a length pointer
    new = {"a": tokens[45:50], "b": tokens[40:43], "c": [5, 6, 7, 8]}
    la, lb, lc = extend_paged(model, [a, b, c], list(new.values()), [5, 3, 4])  # three rows, three lengths
    # a wrote into block 2, shared with b: a copy of it, with a's 13 positions there;
    # c wrote into block 1, shared with a and b: its own copy too. b kept block 2.
    assert a.blocks[2] != b.blocks[2] and c.blocks[1] != a.blocks[1] and b.blocks == [a.blocks[0], a.blocks[1], b.blocks[2]]
    torch.testing.assert_close(la, plain(model, tokens[:50])[45:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lb, plain(model, tokens[:43])[40:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lc, plain(model, tokens[:23] + new["c"])[23:], rtol=1e-5, atol=1e-5)
    # Nothing any fork wrote reached another: a again, then a state restored from a's export.
    (again,) = extend_paged(model, [a], [tokens[50:52]], [2])
    torch.testing.assert_close(again, plain(model, tokens[:52])[50:], rtol=1e-5, atol=1e-5)
    restored = PagedKV.restored(pool, [a.export(0, 30), a.export(30, 52)])
    (more,) = extend_paged(model, [restored], [tokens[52:55]], [3])
    torch.testing.assert_close(more, plain(model, tokens[:55])[52:], rtol=1e-5, atol=1e-5)


def test_rollback_keeps_the_first_agreeing_positions_and_their_blocks():
    model = tiny("qwen2", seed=0)
    pool = pool_of(model, 8)
    for cached, committed, keep in [
        ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6], 5),  # all cached tokens committed
        ([1, 2, 3, 4, 5], [1, 2, 3], 3),  # committed shorter than the cache
        ([1, 2, 3, 4, 5], [9, 2, 3, 4, 5], 0),  # diverges at the first token
        ([1, 2, 3, 4, 5], [1, 2, 7, 4, 5], 2),  # diverges in the middle, agrees after
    ]:
        kv = PagedKV(pool)
        extend_paged(model, [kv], [cached + [70, 71]], [1])  # then two rejected drafts
        blocks = list(kv.blocks)
        kv.rollback_to_prefix_of(committed)
        assert kv.tokens == cached[:keep] and kv.blocks == blocks
        kv.truncate(10)  # longer than cached: nothing changes
        assert kv.tokens == cached[:keep]
        (resumed,) = extend_paged(model, [kv], [committed[keep:] + [9, 10]], [2])
        torch.testing.assert_close(resumed, plain(model, committed + [9, 10])[-2:], rtol=1e-5, atol=1e-5)


def test_exports_restore_a_state_exactly_and_are_copies():
    model = tiny("mistral", seed=0)
    model.config.sliding_window = 4  # every position is cached, past the window too (core/kv.py)
    pool = pool_of(model, 8)
    tokens = [5, 17, 33, 2, 9, 40, 41, 7, 8, 12, 19]
    kv = PagedKV(pool)
    extend_paged(model, [kv], [tokens], [1])
    chunks = [kv.export(0, 6), kv.export(6, len(tokens))]
    restored = PagedKV.restored(pool, chunks)
    assert restored.tokens == tokens
    torch.testing.assert_close(extend_paged(model, [restored], [[3]], [1])[0], plain(model, tokens + [3])[-1:],
                               rtol=1e-5, atol=1e-5)
    before = chunks[0].keys[0].clone()
    kv.truncate(2)
    extend_paged(model, [kv], [[60, 61, 62]], [1])  # the live state moves on; the chunk does not
    assert torch.equal(chunks[0].keys[0], before)
    with pytest.raises(ValueError, match="contiguous"):
        PagedKV.restored(pool, [chunks[0], kv.export(3, 5)])
    with pytest.raises(ValueError, match="layers"):
        PagedKV.restored(pool_of(tiny("mistral", seed=0, layers=3), 4), chunks[:1])
    with pytest.raises(ValueError, match="outside"):
        kv.export(3, 9)


def test_dropped_states_give_their_blocks_back():
    model = tiny("llama", seed=0)
    pool = pool_of(model, 16)
    free = pool.free_blocks
    a = PagedKV(pool)
    extend_paged(model, [a], [list(range(3, 40))], [1])
    branches = [a.fork(n) for n in (37, 30, 12)]
    extend_paged(model, branches, [[5], [6], [7]], [1, 1, 1])
    assert pool.free_blocks < free - 3
    del a, branches  # an ended session, branches the verifier did not take
    gc.collect()
    assert pool.free_blocks == free and not any(pool.refs)


def test_a_step_the_pool_cannot_hold_changes_nothing():
    model = tiny("llama", seed=0)
    pool = pool_of(model, 5)  # 4 usable blocks: 64 positions
    a, b = PagedKV(pool), PagedKV(pool)
    extend_paged(model, [a], [list(range(3, 35))], [1])  # 2 blocks
    extend_paged(model, [b], [list(range(3, 20))], [1])  # 2 blocks: the pool is full
    free, refs, tokens = list(pool.free), list(pool.refs), (list(a.tokens), list(b.tokens))
    with pytest.raises(PoolExhausted, match="free positions"):
        extend_paged(model, [b, a], [[5] * 15, [6]], [1, 1])  # b fits its block; a needs a third
    assert (pool.free, pool.refs, (a.tokens, b.tokens)) == (free, refs, tokens)
    (logits,) = extend_paged(model, [b], [[5] * 15], [1])  # b alone still fits
    torch.testing.assert_close(logits, plain(model, list(range(3, 20)) + [5] * 15)[-1:], rtol=1e-5, atol=1e-5)


def test_branches_the_pool_cannot_hold_are_not_drafted():
    model = tiny("llama", seed=0)
    proposer = DraftModelProposer(model, kv_cache_bytes=5 * BLOCK_TOKENS * kv_bytes_per_token(model.config, model.dtype))
    session = proposer.new_state()
    base = list(range(3, 33))  # 30 tokens: 2 of the 4 usable blocks once drafted
    proposer.propose(session, base, 2, SamplingParams())
    # Two branches, each forking mid-block and drafting 4 (34 positions): each needs a
    # copy of the shared second block and a third; the pool has two blocks left, so
    # the second branch is dropped.
    branches = [session.fork(30), session.fork(30)]
    out = proposer.propose_branches(branches, [base + [7], base + [8]], [4, 4], SamplingParams())
    assert len(out[0]) == 4 and len(out[1]) == 0
    alone = DraftModelProposer(model).propose(DraftModelProposer(model).new_state(), base + [7], 4, SamplingParams())
    assert out[0].tokens.tolist() == alone.tokens.tolist()
    with pytest.raises(PoolExhausted):  # a lone draft is refused (its worker then refuses the stream)
        proposer.propose(session.fork(30), base + [9] * 30, 4, SamplingParams())

"""Draft steps from concurrent sessions meet in one batched forward pass and each
session gets what it would get alone."""

import threading

import torch
from tiny_models import plain_logits, tiny

from services.core.kv_pool import KVPool
from services.core.paged_kv import PagedKV
from services.drafter.steps import StepBatcher


def paged(model):
    """A maker of draft states in one small pool (what a draft worker's proposer holds)."""
    pool = KVPool.for_model(model, 2**22)
    return lambda: PagedKV(pool)


def test_concurrent_steps_are_batched_and_exact():
    model = tiny("llama", seed=0)
    batcher = StepBatcher(model, max_batch_size=8)
    prompts = [[5, 6, 7], [9], [10, 11, 12, 13, 14], [20, 21]]
    new_state = paged(model)
    alone = [list(plain_logits(model, p + [40, 41, 42, 43])[len(p) - 1 :]) for p in prompts]
    got = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def session(i):
        kv = new_state()
        start.wait()
        got[i] = batcher.step([kv], [prompts[i]]) + [batcher.step([kv], [[40 + j]])[0] for j in range(4)]

    threads = [threading.Thread(target=session, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for expected, actual in zip(alone, got):
        for e, a in zip(expected, actual):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    assert max(batcher.batch_sizes) > 1, "steps were not batched"


def test_a_failing_step_fails_only_its_session():
    model = tiny("llama", seed=0)
    batcher = StepBatcher(model)
    feeds = [[3, 4], [10_000], [5]]  # the middle one is out of the vocabulary
    results = [None] * 3
    start = threading.Barrier(3)
    new_state = paged(model)

    def session(i):
        start.wait()
        try:
            results[i] = batcher.step([new_state()], [feeds[i]])[0]
        except (IndexError, RuntimeError) as error:
            results[i] = error

    threads = [threading.Thread(target=session, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results[1], (IndexError, RuntimeError))
    for i in (0, 2):
        torch.testing.assert_close(results[i], plain_logits(model, feeds[i])[-1], rtol=1e-5, atol=1e-5)


def test_a_sessions_branches_go_in_one_pass():
    """The speculation cache's branches: one call, several KV states, one forward."""
    model = tiny("llama", seed=0)
    batcher = StepBatcher(model)
    base = paged(model)()
    batcher.step([base], [[5, 6, 7, 8]])
    forks = [base.fork(4), base.fork(3), base.fork(2)]
    feeds = [[9], [30], [31]]
    alone = [plain_logits(model, [5, 6, 7, 8][: len(f)] + feed)[-1] for f, feed in zip(forks, feeds)]
    got = batcher.step(forks, feeds)
    for expected, actual in zip(alone, got):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert batcher.batch_sizes[-1] == 3
    assert base.tokens == [5, 6, 7, 8] and [f.tokens for f in forks] == [[5, 6, 7, 8, 9], [5, 6, 7, 30], [5, 6, 31]]


def test_a_finished_step_keeps_no_state_alive():
    """A session's draft KV goes back to the pool as soon as the session lets go of it:
    the batcher, waiting for its next step, holds nothing of the last one."""
    model = tiny("llama", seed=0)
    batcher = StepBatcher(model)
    pool = KVPool.for_model(model, 2**22)
    free = pool.free_blocks
    states = [PagedKV(pool), PagedKV(pool)]
    batcher.step(states, [list(range(3, 40)), [5, 6]])
    branch = states[0].fork(20)
    batcher.step([branch], [[7]])
    assert pool.free_blocks < free
    del states, branch  # no collection needed: nothing refers to them in a cycle
    assert pool.free_blocks == free and not any(pool.refs)

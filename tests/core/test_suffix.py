"""SuffixDecoding: the suffix index's counts, matches, eviction and rollback against
brute force; candidate trees; cross-session drafting; exact greedy output through the
engine with drafts accepted."""

import itertools
import math
import random
import threading

import pytest
from tiny_models import hf_greedy, tiny

from services.core.engine import SpeculativeEngine
from services.core.gamma import GammaSchedule
from services.core.sampling import SamplingParams
from services.core.suffix import SuffixIndex, SuffixProposer
from services.core.target import TargetRunner
from services.core.tree import tree_shape
from services.core.verifier import TargetVerifier


def occurrences(seqs, s):
    s = list(s)
    return sum(seq[i:i + len(s)] == s for seq in seqs for i in range(len(seq) - len(s) + 1))


def continued(seqs, s):
    """How often ``s`` is followed by each token."""
    out = {}
    for seq in seqs:
        for i in range(len(seq) - len(s)):
            if seq[i:i + len(s)] == list(s):
                out[seq[i + len(s)]] = out.get(seq[i + len(s)], 0) + 1
    return out


def brute_match(seqs, context, depth, max_len=None):
    top = min(depth - 1, len(context), depth if max_len is None else max_len)
    return next((n for n in range(top, 0, -1) if continued(seqs, context[len(context) - n:])), 0)


def live(index):
    return [index.tail(h, 10**9) for h in index.sequences()]


def assert_exact(index, vocab):
    """Every string's count equals its occurrences in what the index holds, and there
    is one node per distinct substring."""
    seqs = live(index)
    distinct = {tuple(seq[i:j]) for seq in seqs for i in range(len(seq))
                for j in range(i + 1, min(len(seq), i + index.max_depth) + 1)}
    assert index.num_nodes == len(distinct)
    assert index.num_tokens == sum(map(len, seqs))
    for n in range(1, index.max_depth + 1):
        for s in itertools.product(range(vocab), repeat=n):
            assert index.count(s) == occurrences(seqs, s), s


def test_counts_and_longest_match_equal_brute_force():
    rng = random.Random(0)
    index = SuffixIndex(max_depth=5, max_nodes=10**6)
    seqs = {h: [] for h in (index.new_sequence() for _ in range(3))}
    for _ in range(40):  # sequences grow a few tokens at a time, interleaved
        h = rng.choice(list(seqs))
        chunk = [rng.randrange(3) for _ in range(rng.randrange(1, 5))]
        index.append(h, chunk)
        seqs[h] += chunk
    assert sorted(map(tuple, live(index))) == sorted(map(tuple, seqs.values()))
    assert_exact(index, 3)
    for _ in range(300):
        context = [rng.randrange(4) for _ in range(rng.randrange(0, 9))]  # token 3 never occurs
        max_len = rng.choice([None, 1, 2, 3])
        node, n = index.match(context, max_len)
        assert n == brute_match(list(seqs.values()), context, 5, max_len)
        assert (node is None) == (n == 0)
        if n:
            assert index.count(context[len(context) - n:]) == occurrences(seqs.values(), context[len(context) - n:])


def test_pop_and_eviction_stay_exact():
    rng = random.Random(1)
    index = SuffixIndex(max_depth=4, max_nodes=40, max_tokens=30)
    handles = [index.new_sequence() for _ in range(4)]
    for step in range(300):
        h = rng.choice(handles)
        if rng.random() < 0.25:
            index.pop(h, rng.randrange(1, 6))
        else:
            index.append(h, [rng.randrange(4) for _ in range(rng.randrange(1, 6))])
        assert index.num_nodes <= 40 and index.num_tokens <= 30
        if step % 10 == 0:
            assert_exact(index, 4)
    assert_exact(index, 4)


def test_a_sequence_alone_over_the_cap_loses_its_oldest_tokens():
    index = SuffixIndex(max_depth=4, max_nodes=14)
    rng = random.Random(2)
    seq = [rng.randrange(1000) for _ in range(100)]
    for t in seq:
        index.append(7, [t])
        assert index.num_nodes <= 14
    kept = index.tail(7, 10**9)
    assert kept == seq[-len(kept):] and len(kept) >= 4
    assert index.count(seq[:2]) == 0 and index.count(seq[-4:]) == 1
    assert index.match(seq[-5:-2])[1] == 3  # the active suffixes survived


def test_bounded_memory_evicts_the_oldest_sequences_first():
    cap = 200
    proposer = SuffixProposer(SuffixIndex(max_depth=6, max_nodes=cap))
    rng = random.Random(3)
    outputs = []
    for _ in range(60):
        prompt = [rng.randrange(10**6) for _ in range(3)]
        output = [rng.randrange(10**6) for _ in range(12)]
        state = proposer.new_state()
        proposer.propose(state, prompt, 4, SamplingParams(prompt_len=3))
        for k in range(0, 12, 4):  # committed round by round
            proposer.propose(state, prompt + output[:k + 4], 4, SamplingParams(prompt_len=3))
            assert proposer.index.num_nodes <= cap
        outputs.append(output)
    survivors = [o for o in outputs if proposer.index.count(o[:2])]
    assert 0 < len(survivors) < len(outputs)
    assert survivors == outputs[len(outputs) - len(survivors):]  # the newest ones
    assert len(proposer.index.sequences()) == len(survivors)
    # A new session whose prompt ends like an evicted output drafts nothing; like a kept
    # one, its continuation (a match of 2 = max_depth - gamma tokens drafts 2).
    for output, want in ((outputs[0], []), (outputs[-1], outputs[-1][4:6])):
        proposal = proposer.propose(proposer.new_state(), [5, 6] + output[:4], 4, SamplingParams(prompt_len=6))
        assert proposal.tokens.tolist() == want


@pytest.mark.parametrize("seed", range(3))
def test_candidate_trees(seed):
    rng = random.Random(seed)
    seqs = [[rng.choice([0, 0, 1, 2, 3]) for _ in range(rng.randrange(5, 60))] for _ in range(6)]
    index = SuffixIndex(max_depth=8, max_nodes=10**6)
    for seq in seqs:
        index.append(index.new_sequence(), seq)
    grown = 0
    for _ in range(200):
        context = [rng.randrange(4) for _ in range(rng.randrange(1, 10))]
        gamma, budget, alpha = rng.randrange(1, 6), rng.randrange(1, 12), rng.choice([0.5, 1.0, 3.0])
        draft = index.speculate(context, gamma, budget, alpha, min_prob=0.05)
        if draft is None:
            assert brute_match(seqs, context, 8, max(1, 8 - min(gamma, budget))) == 0
            continue
        n = draft.match_len
        assert n == brute_match(seqs, context, 8, max(1, 8 - min(gamma, budget)))
        assert len(draft.tokens) <= min(budget, math.ceil(alpha * n))
        shape = tree_shape(tuple(draft.parents))  # raises unless every parent precedes its children
        assert shape.max_depth <= gamma
        paths = []
        for i, (token, parent) in enumerate(zip(draft.tokens, draft.parents)):
            prefix = context[len(context) - n:] + ([] if parent < 0 else paths[parent])
            paths.append(prefix[n:] + [token])
            # a real continuation, with the probability its counts say
            follow = continued(seqs, prefix)
            assert follow.get(token, 0) > 0
            up = 1.0 if parent < 0 else draft.probs[parent]
            assert draft.probs[i] == pytest.approx(up * follow[token] / sum(follow.values()))
            assert draft.probs[i] >= 0.05
        for row in shape.children:  # siblings by descending probability
            kids = [int(k) for k in row if k >= 0]
            assert all(draft.probs[a] >= draft.probs[b] for a, b in zip(kids, kids[1:]))
        # Greedy by path probability: nothing left out beats what was taken, once the size is spent.
        if len(draft.tokens) == min(budget, math.ceil(alpha * n)):
            taken = {tuple(p) for p in paths}
            for path, i in [([], -1)] + [(p, i) for i, p in enumerate(paths) if len(p) < gamma]:
                up = 1.0 if i < 0 else draft.probs[i]
                follow = continued(seqs, context[len(context) - n:] + path)
                for token, c in follow.items():
                    if tuple(path + [token]) not in taken:
                        assert up * c / sum(follow.values()) <= min(draft.probs) + 1e-12
        grown += len(draft.tokens) > 1 and not shape.is_chain
    assert grown > 0  # some drafts were real trees


def test_unlikely_continuations_are_not_drafted():
    index = SuffixIndex(max_depth=4, max_nodes=10**4)
    for k in range(20):  # after 9, each of 20 tokens once: 5% each
        index.append(index.new_sequence(), [9, 100 + k])
    assert index.speculate([9], 3, 30, alpha=30, min_prob=0.1) is None
    draft = index.speculate([9], 3, 30, alpha=30, min_prob=0.05)
    assert sorted(draft.tokens) == list(range(100, 120)) and draft.parents == [-1] * 20


def test_proposals_respect_gamma_and_the_round_budget():
    proposer = SuffixProposer(max_nodes_per_round=6)
    rng = random.Random(4)
    prompt = [rng.choice([1, 2, 3, 4]) for _ in range(400)]
    state = proposer.new_state()
    for gamma in [0, 1, 2, 3, 5, 8]:
        proposal = proposer.propose(state, prompt, gamma, SamplingParams(prompt_len=len(prompt)))
        assert len(proposal) <= 6 and proposal.depth <= gamma and proposal.draft_q is None
        assert (len(proposal) == 0) == (gamma == 0)


def test_repetitive_prompt_predicts_the_continuation():
    phrase = [17, 4, 88, 23, 9, 51, 6, 70, 12]
    prompt = [3, 2] + phrase * 3 + phrase[:4]
    proposer = SuffixProposer()
    proposal = proposer.propose(proposer.new_state(), prompt, 5, SamplingParams(prompt_len=len(prompt)))
    assert proposal.tokens.tolist() == phrase[4:9] and proposal.tree is None


def test_a_sessions_output_drafts_for_another_session():
    output = [61, 62, 63, 64, 65, 66, 67, 68, 69, 70]
    proposer = SuffixProposer()
    a = proposer.new_state()
    prompt_a = [1, 2, 3]
    proposer.propose(a, prompt_a, 4, SamplingParams(prompt_len=3))
    for k in range(2, 11, 2):  # A commits its output round by round, and is still running
        proposer.propose(a, prompt_a + output[:k], 4, SamplingParams(prompt_len=3))
    prompt_b = [40, 41, 42] + output[:4]
    proposal = proposer.propose(proposer.new_state(), prompt_b, 4, SamplingParams(prompt_len=7))
    assert proposal.tokens.tolist() == output[4:8]
    # Without A's output (another replica's proposer), B's own prompt has nothing to offer.
    alone = SuffixProposer()
    assert len(alone.propose(alone.new_state(), prompt_b, 4, SamplingParams(prompt_len=7))) == 0
    # The prompt went to A's private index alone.
    assert proposer.index.count(prompt_a[-1:]) == 0 and a.local.count(prompt_a) == 1


def test_without_a_prompt_length_the_first_context_is_the_prompt():
    proposer = SuffixProposer()
    state = proposer.restore_state([])
    proposer.propose(state, [1, 2, 3], 2, SamplingParams())
    proposer.propose(state, [1, 2, 3, 4, 5], 2, SamplingParams())
    assert proposer.index.tail(state.handle, 10) == [4, 5] and state.local.tail(0, 10) == [1, 2, 3, 4, 5]


def test_refuted_guesses_are_taken_back():
    """A pipelined draft worker proposes after guessed tokens the verifier then refutes."""
    proposer = SuffixProposer()
    state = proposer.new_state()
    prompt = [1, 2, 3, 4]
    proposer.propose(state, prompt + [10, 11], 3, SamplingParams(prompt_len=4))
    proposer.propose(state, prompt + [10, 11, 12, 13, 99], 3, SamplingParams(prompt_len=4))  # 12, 13, 99 guessed
    proposer.propose(state, prompt + [10, 11, 12, 50], 3, SamplingParams(prompt_len=4))  # 13 was refuted
    for index in (state.local, proposer.index):
        assert index.count([13]) == 0 and index.count([99]) == 0 and index.count([12, 50]) == 1
    assert proposer.index.tail(state.handle, 100) == [10, 11, 12, 50]
    assert state.local.tail(0, 100) == prompt + [10, 11, 12, 50]


def test_the_shared_index_is_thread_safe():
    index = SuffixIndex(max_depth=4, max_nodes=10**6)
    rng = random.Random(5)
    data = [[[rng.randrange(3) for _ in range(3)] for _ in range(200)] for _ in range(4)]

    def run(chunks):
        h = index.new_sequence()
        for chunk in chunks:
            index.append(h, chunk)
            index.speculate(chunk, 3, 8)

    threads = [threading.Thread(target=run, args=(chunks,)) for chunks in data]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(index.sequences()) == 4
    assert_exact(index, 3)


PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7], [11, 12, 11, 12, 11, 12, 40, 41], [20, 21, 22, 23] * 4 + [20, 21]]


@pytest.fixture(scope="module")
def target():
    return tiny("llama", seed=0)


def engine(target, proposer, gamma):
    return SpeculativeEngine(TargetVerifier(TargetRunner(target)), proposer, None, 256, GammaSchedule(gamma))


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_greedy_output_equals_the_target_alone(target, gamma):
    proposer = SuffixProposer()  # shared across the prompts: later ones also draft from earlier outputs
    eng = engine(target, proposer, gamma)
    rounds = []
    for prompt in PROMPTS + PROMPTS[:1]:
        result = eng.generate(prompt, 40)
        assert result.token_ids == hf_greedy(target, prompt, 40, eos=None)
        assert result.stats.accepted <= result.stats.drafted
        rounds.append(result.stats.rounds)
    assert sum(rounds) <= 0.85 * 40 * len(rounds)  # drafts were accepted
    # The repeated prompt drafts its output from the first run's: nearly gamma + 1 tokens
    # a round (its first rounds know no more than the prompt).
    assert rounds[-1] <= -(-40 // (gamma + 1)) + 3 < rounds[0]


def test_sampling_runs_and_is_reproducible(target):
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=7)
    runs = []
    for _ in range(2):
        eng = engine(target, SuffixProposer(), 4)
        results = [eng.generate(prompt, 40, params) for prompt in PROMPTS]
        assert all(len(r.token_ids) == 40 for r in results)
        assert sum(r.stats.drafted for r in results) > 0
        runs.append([r.token_ids for r in results])
    assert runs[0] == runs[1]

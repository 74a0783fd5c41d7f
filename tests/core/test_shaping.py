"""Logit shaping (penalties, logit bias, min_tokens), stops and logprobs under speculation:
greedy output equals transformers' generate with the same processors, for chains and
trees; sampled output follows the shaped target's distribution whatever the drafter
proposes; logprobs equal target-only decoding's."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from distribution import ALPHA, check_power, chi2_pvalue
from tiny_models import noisy_copy, random_eagle, random_heads, random_mtp, tiny

from services.core.draft_q import SparseQ, compact
from services.core.eagle_proposer import EagleProposer, EagleTree
from services.core.engine import SpeculativeEngine
from services.core.gamma import GammaSchedule
from services.core.head_proposers import MedusaProposer
from services.core.mtp_proposer import MtpProposer
from services.core.multi_draft import TreeProposer
from services.core.proposals import Proposal
from services.core.proposers import DraftModelProposer, NgramProposer
from services.core.sampling import Penalties, SamplingParams, StopRule, adjusted_probs
from services.core.suffix import SuffixProposer
from services.core.shaping import ContextCounts, CountedContext, ShapeRow, StepShaper, shape_logits
from services.core.target import TargetRunner
from services.core.tree import choice_tree, parse_choices, tree_shape
from services.core.verifier import AcceptRow, TargetVerifier, VerifyRequest, accept

PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7], [3], list(range(20, 60))]
TREE = choice_tree(parse_choices("0;1;2;0.0;0.1;1.0;0.0.0;0.1.0;0.0.0.0"))


def reference_shape(logits: torch.Tensor, context: list[int], prompt_len: int, params: SamplingParams) -> torch.Tensor:
    """The rules written out token by token, as transformers and OpenAI state them."""
    z = logits.clone().float()
    pen, stop = params.penalties, params.stop
    for token, bias in pen.logit_bias:
        z[token] += bias
    for token in set(context):
        z[token] = z[token] / pen.repetition if z[token] > 0 else z[token] * pen.repetition
    output = context[prompt_len:]
    for token in set(output):
        z[token] -= pen.frequency * output.count(token) + pen.presence
    if stop is not None and len(output) < stop.min_tokens:
        z[list(stop.token_ids)] = float("-inf")
    return z


PARAMS = SamplingParams(temperature=0.9, penalties=Penalties(1.4, 0.3, 0.6, ((2, 1.5), (7, -2.0))),
                        stop=StopRule((1, 4), min_tokens=5), prompt_len=3)


@pytest.mark.parametrize("parents", [None, (-1, 0, 0, 1, 3, 2)], ids=["chain", "tree"])
def test_every_slot_is_shaped_with_its_own_prefix(parents):
    V, committed = 12, [3, 5, 3, 6, 2]  # prompt 3 tokens, output [6, 2]: min_tokens 5 binds at depth <= 2
    drafts = [2, 6, 9, 2, 1, 6]
    tree = None if parents is None else tree_shape(parents)
    if tree is None:
        drafts = drafts[:4]
    T = len(drafts) + 1
    logits = torch.randn(1, T, V, generator=torch.Generator().manual_seed(0)) * 3
    shaped = shape_logits(logits.clone(), [ShapeRow(PARAMS, committed, drafts, tree)])[0]
    for t in range(T):
        if t == 0:
            path = []
        elif tree is None:
            path = drafts[:t]
        else:
            path, node = [], t - 1
            while node >= 0:
                path.insert(0, drafts[node])
                node = parents[node]
        want = reference_shape(logits[0, t], committed + path, 3, PARAMS)
        assert torch.allclose(shaped[t], want, atol=1e-6), f"slot {t}"


def test_real_vocabulary_and_context_with_counts_kept_across_rounds():
    """V = 151,936, a 4k-token context, counts carried from round to round as the engine
    carries them: every slot equals the rules applied from scratch."""
    V, gen = 151_936, torch.Generator().manual_seed(1)
    context = torch.randint(0, V, (4096,), generator=gen).tolist()
    params = SamplingParams(penalties=Penalties(1.2, 0.5, 0.3, ((7, 1.0),)), stop=StopRule((2,), min_tokens=0),
                            prompt_len=3000)
    counts = ContextCounts()
    for end in (3500, 3507, 4096):  # three rounds, the context grown between them
        drafts = torch.randint(0, V, (8,), generator=gen).tolist() + context[end - 3 : end - 1]
        logits = torch.randn(1, len(drafts) + 1, V, generator=gen)
        shaped = shape_logits(logits.clone(), [ShapeRow(params, context[:end], drafts, counts=counts)])[0]
        for t in (0, 4, len(drafts)):
            want = reference_shape(logits[0, t], context[:end] + drafts[:t], 3000, params)
            assert torch.allclose(shaped[t], want, atol=1e-5), (end, t)


@pytest.mark.parametrize("V, prompt_len, params", [
    (12, 3, PARAMS),  # every rule, min_tokens binding for the first slots
    (151_936, 3000, SamplingParams(penalties=Penalties(1.2, 0.5, 0.3, ((7, 1.0),)), prompt_len=3000)),
    (151_936, 3000, SamplingParams(penalties=Penalties(1.1), prompt_len=3000)),  # repetition alone
], ids=["all-rules", "real-shape", "repetition"])
def test_a_drafters_step_shaper_equals_shape_logits_slot_by_slot(V, prompt_len, params):
    """The drafter's per-step shaper gives each slot exactly what shape_logits gives
    it, through tokens it has seen and new ones, at the bundled and a real vocabulary."""
    gen = torch.Generator().manual_seed(2)
    context = torch.randint(0, V, (prompt_len + 2 if V > 100 else 5,), generator=gen).tolist()
    if V > 100:
        context = context[:prompt_len] + context[:2]  # an output that repeats the prompt
    shaper = StepShaper(params, context, "cpu")
    drafted = []
    for step in range(8):
        logits = torch.randn(V, generator=gen) * 3
        want = shape_logits(logits[None, None].clone(), [ShapeRow(params, context + drafted, [])])[0, 0]
        assert torch.equal(shaper.apply(logits.clone()), want), f"step {step}"
        token = context[step % len(context)] if step % 2 else int(torch.randint(0, V, (1,), generator=gen))
        drafted.append(token)
        shaper.append(token)


def test_a_drafters_counted_context_grows_like_a_fresh_count():
    """Rounds of a pipelined session at a real vocabulary: a fresh draft after the
    committed text, the bonus guesses after its drafts, a branch for an outcome, then
    the committed text after a rejection. Each count equals a fresh one and leaves the
    counts it grew from as they were."""
    gen = torch.Generator().manual_seed(5)
    V, prompt_len = 151_936, 3000
    text = torch.randint(0, V, (prompt_len + 40,), generator=gen).tolist()
    text[prompt_len + 5: prompt_len + 9] = text[10:14]  # an output that repeats the prompt
    committed = text[: prompt_len + 3]
    cached, grown_from = None, []
    for drafts, accepted, token in [(text[prompt_len + 3: prompt_len + 9], 6, 77), (text[20:26], 2, text[30]),
                                    (text[prompt_len + 20: prompt_len + 26], 0, 5)]:
        for context in (committed, committed + drafts, committed + drafts[:accepted] + [token]):
            snapshot = None if cached is None else (cached.counts.cols.copy(), cached.counts.output.copy())
            counted = CountedContext.of(cached, context, prompt_len)
            fresh = ContextCounts().update(context, prompt_len)
            assert np.array_equal(counted.counts.cols, fresh.cols) and np.array_equal(counted.counts.output, fresh.output)
            if snapshot is not None:
                assert np.array_equal(cached.counts.cols, snapshot[0]) and np.array_equal(cached.counts.output, snapshot[1])
            grown_from.append(counted.previous is not None or counted is cached)
            if context is not committed + drafts[:accepted] + [token]:  # a branch lives on its fork
                cached = counted
        committed = committed + drafts[:accepted] + [token]
    # Every count after the first grew from an earlier one, the rejection's too (one step back).
    assert grown_from[0] is False and all(grown_from[1:])
    # Another session's context, or another prompt length, is counted afresh.
    assert CountedContext.of(cached, text[:50], prompt_len).previous is None
    assert CountedContext.of(cached, committed, prompt_len - 1).previous is None


def test_rows_without_rules_are_not_copied():
    logits = torch.randn(2, 3, 10)
    assert shape_logits(logits, [None, ShapeRow(SamplingParams(), [1], [2, 3])]) is logits


def hf_reference(target, prompt, n, eos, params: SamplingParams) -> list[int]:
    pen = params.penalties
    out = target.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=n,
        do_sample=False, eos_token_id=eos, pad_token_id=0, repetition_penalty=pen.repetition,
        sequence_bias={(t,): b for t, b in pen.logit_bias} or None,
        min_new_tokens=params.stop.min_tokens if params.stop else 0,
    )
    return out[0, len(prompt):].tolist()


GREEDY = SamplingParams(penalties=Penalties(repetition=1.3, logit_bias=((17, 3.0), (40, -4.0))))


@pytest.fixture(scope="module")
def target():
    return tiny("llama", seed=0)


def engine(target, proposer, gamma=4, eos=None):
    return SpeculativeEngine(TargetVerifier(TargetRunner(target, kv_cache_bytes=2**24)), proposer, eos, 256,
                             GammaSchedule(gamma))


@pytest.mark.parametrize("drafter", ["noisy", "ngram", "medusa"])
def test_greedy_with_penalties_matches_transformers(target, drafter):
    proposer = {"noisy": lambda: DraftModelProposer(noisy_copy(target, 1, 0.6)), "ngram": NgramProposer,
                "medusa": lambda: MedusaProposer(random_heads(target, 3), TREE)}[drafter]()
    eng = engine(target, proposer)
    for prompt in PROMPTS:
        assert eng.generate(prompt, 30, GREEDY).token_ids == hf_reference(target, prompt, 30, None, GREEDY)


def test_min_tokens_masks_eos_like_transformers(target):
    prompt = PROMPTS[0]
    plain = hf_reference(target, prompt, 40, None, SamplingParams())
    eos = plain[3]  # would end the output at its 4th token
    params = SamplingParams(stop=StopRule((eos,), min_tokens=12))
    want = hf_reference(target, prompt, 40, eos, params)
    got = engine(target, DraftModelProposer(noisy_copy(target, 1, 0.6)), eos=eos).generate(prompt, 40, params).token_ids
    assert got == want and eos not in want[:12]


def test_stop_token_inside_a_block_ends_the_output_there(target):
    prompt = PROMPTS[2]
    plain = engine(target, None).generate(prompt, 30).token_ids
    stop = next(t for i, t in enumerate(plain) if i >= 4 and t not in plain[:i])
    eng = engine(target, DraftModelProposer(target), gamma=8)  # the target drafts for itself: whole blocks accepted
    seq = eng.start(prompt, 30, SamplingParams(stop=StopRule((stop,))))
    eng.prefill(seq)
    while not seq.finished:
        eng.step(seq)
    assert seq.generated == plain[: plain.index(stop) + 1] and seq.stopped_by == stop


@pytest.fixture(scope="module")
def target4():
    return tiny("llama", seed=0, layers=4)  # EAGLE-3 fuses a low, a middle and a high layer


PROPOSERS = {
    "draft": lambda t: DraftModelProposer(noisy_copy(t, 1, 0.6)),
    "ngram": lambda t: NgramProposer(),
    "suffix": lambda t: SuffixProposer(),
    "medusa": lambda t: MedusaProposer(random_heads(t, 3), TREE),
    "mtp": lambda t: MtpProposer(random_mtp(t, 3), choice_tree(parse_choices("0;1;0.0;0.1;0.0.0"))),
    "eagle": lambda t: EagleProposer(random_eagle(t, 1), EagleTree(depth=4, top_k=3, nodes=10)),
    "tree": lambda t: TreeProposer([DraftModelProposer(noisy_copy(t, 1, 0.6)), SuffixProposer()]),
}


@pytest.mark.parametrize("method", list(PROPOSERS))
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_logprobs_equal_target_only(target, target4, method, sampled):
    params = SamplingParams(temperature=0.8, top_k=20, seed=3) if sampled else SamplingParams()
    params = replace(params, penalties=Penalties(repetition=1.2, frequency=0.4))
    if method == "eagle":
        target = target4
    proposer = PROPOSERS[method](target)

    def run(eng):
        seq = eng.start(PROMPTS[0], 24, params, logprobs=3)
        eng.prefill(seq)
        lps, tops = [], []
        while not seq.finished:
            result = eng.verify_and_commit(seq, eng.propose(seq))
            lps += result.logprobs
            tops += result.top_logprobs
        return seq.generated, lps, tops, seq.stats

    tokens, lps, tops, stats = run(engine(target, proposer))
    ref_tokens, ref_lps, ref_tops, _ = run(engine(target, None))
    assert stats.drafted > 0  # the logprobs below came through speculative rounds
    if sampled:  # a different draft makes a different sample; score the same tokens target-only instead
        ref_lps, ref_tops = scored(target, PROMPTS[0], tokens, params)
    else:
        assert tokens == ref_tokens
    assert len(lps) == len(tokens) == len(tops)
    np.testing.assert_allclose(lps, ref_lps, atol=1e-5)
    assert [[i for i, _ in t] for t in tops] == [[i for i, _ in t] for t in ref_tops]
    assert all(lp <= 0 for lp in lps) and all(len(t) == 3 for t in tops)


def scored(target, prompt, tokens, params):
    """Each token's logprob and top 3 under the shaped, adjusted target, one position at a time."""
    with torch.no_grad():
        logits = target(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    lps, tops = [], []
    for i, token in enumerate(tokens):
        z = reference_shape(logits[i], prompt + tokens[:i], len(prompt), params)
        logp = adjusted_probs(z, params).log()
        lps.append(float(logp[token]))
        values, ids = logp.topk(3)
        tops.append(list(zip(ids.tolist(), values.tolist())))
    return lps, tops


def test_sampled_output_follows_the_shaped_target_whatever_the_draft():
    """Rows of one round share the target's logits; each drafts 2 tokens. The first
    emitted token must follow the shaped p at slot 0, and the second, given the first,
    the shaped p at slot 1 after it (the draft before a slot shapes it), although the
    second draft comes from an unshaped q."""
    V, B = 8, 120_000
    gen = torch.Generator().manual_seed(0)
    committed = [1, 2, 1]
    params = SamplingParams(temperature=1.0, penalties=Penalties(1.8, 0.4, 0.9, ((5, 0.7),)), prompt_len=2,
                            stop=StopRule((0,), min_tokens=2))  # token 0 masked at slot 0 only
    logits = torch.randn(3, V, generator=gen) * 1.5
    logits[0, 3] += 3.0  # most rows emit token 3 first: enough of them to test slot 1 after it
    p0 = adjusted_probs(reference_shape(logits[0], committed, 2, params), params)
    q1 = compact(0.8 * p0 + 0.2 / V)  # close to p0: the first draft is mostly accepted, sometimes not
    q2 = compact(adjusted_probs(logits[1], SamplingParams(temperature=1.0)))  # unshaped
    drafts = torch.stack([torch.multinomial(q.dense()[0], B, replacement=True, generator=gen) for q in (q1, q2)], -1)
    qs = SparseQ.stack([q1, q2])
    batch = [VerifyRequest(None, committed, Proposal(drafts[b], qs), replace(params, seed=b), 0) for b in range(B)]
    outcomes = accept([AcceptRow.of(req) for req in batch], [logits] * B)
    rng = np.random.default_rng(0)
    first = np.array([o.tokens[0] for o in outcomes])
    assert chi2_pvalue(first, p0.numpy()) > ALPHA
    check_power(len(first), p0.numpy(), rng)
    after_3 = np.array([o.tokens[1] for o in outcomes if o.tokens[0] == 3 and len(o.tokens) > 1])
    p1 = adjusted_probs(reference_shape(logits[1], committed + [3], 2, params), params).numpy()
    assert chi2_pvalue(after_3, p1) > ALPHA
    check_power(len(after_3), p1, rng)

"""Greedy speculative decoding is token-identical to transformers' greedy generate."""

import pytest
from tiny_models import FAMILIES, hf_greedy, noisy_copy, tiny

from services.core.engine import SpeculativeEngine
from services.core.errors import InvalidRequest
from services.core.gamma import GammaSchedule
from services.core.proposers import DraftModelProposer, NgramProposer
from services.core.sampling import SamplingParams
from services.core.verifier import TargetVerifier
from services.core.target import TargetRunner
from services.models.lean import use_lean_decoding

PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7], [3], [11, 12, 11, 12, 11, 12, 40, 41], list(range(20, 60))]


def engine(target, proposer, gamma=4, adaptive=False, eos=None, confidence=None):
    if confidence is not None:
        proposer.confidence_stop = confidence
    return SpeculativeEngine(TargetVerifier(TargetRunner(target)), proposer, eos, 256, GammaSchedule(gamma, adaptive))


@pytest.fixture(scope="module")
def models():
    target = tiny("llama", seed=0)
    return {"target": target, "noisy": noisy_copy(target, 1, 0.6), "self": target,
            "small": tiny("llama", seed=2, layers=1)}


@pytest.mark.parametrize("gamma", range(1, 9))
@pytest.mark.parametrize("drafter", ["noisy", "self", "small", "ngram"])
def test_greedy_matches_transformers(models, drafter, gamma):
    target = models["target"]
    proposer = NgramProposer() if drafter == "ngram" else DraftModelProposer(models[drafter])
    eng = engine(target, proposer, gamma)
    for prompt in PROMPTS:
        assert eng.generate(prompt, 37).token_ids == hf_greedy(target, prompt, 37, eos=None)


@pytest.mark.parametrize("lean", [False, True], ids=["transformers-forward", "lean-decoders"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_across_families(family, lean):
    target = tiny(family, seed=0)
    draft = noisy_copy(target, 3, 0.5)
    if lean:  # both models' passes on their lean decoders (models/lean.py), as load_model serves them
        for model in (target, draft):
            assert use_lean_decoding(model).lean_decoder is not None
    for proposer in (DraftModelProposer(draft), NgramProposer()):
        for gamma in (2, 5):
            eng = engine(target, proposer, gamma)
            for prompt in PROMPTS[:3]:
                assert eng.generate(prompt, 30).token_ids == hf_greedy(target, prompt, 30, eos=None)


@pytest.mark.parametrize("gamma", [3, 6])
def test_eos_inside_a_draft_block_stops_like_transformers(models, gamma):
    target = models["target"]
    prompt = PROMPTS[0]
    ref = hf_greedy(target, prompt, 40, eos=None)
    # Pick EOS as a token that first appears mid-output, so a fully-accepted draft
    # block (draft == target) contains it before the block ends.
    eos = next(t for i, t in enumerate(ref) if i >= 5 and t not in ref[:i])
    want = hf_greedy(target, prompt, 40, eos=eos)
    assert want[-1] == eos and len(want) < 40
    for proposer in (DraftModelProposer(target), DraftModelProposer(models["noisy"]), NgramProposer()):
        result = engine(target, proposer, gamma, eos=eos).generate(prompt, 40)
        assert result.token_ids == want


@pytest.mark.parametrize("max_new", [1, 2, 7, 13])
def test_max_new_tokens_landing_mid_block(models, max_new):
    target = models["target"]
    result = engine(target, DraftModelProposer(target), gamma=4).generate(PROMPTS[0], max_new)
    assert result.token_ids == hf_greedy(target, PROMPTS[0], max_new, eos=None)
    assert result.stats.emitted == max_new
    # A self-draft is always accepted, so rounds are as long as the budget allows.
    assert result.stats.rounds == -(-max_new // 5)


def test_adaptive_gamma_and_confidence_stop_stay_exact(models):
    target = models["target"]
    for eng in (
        engine(target, DraftModelProposer(models["noisy"]), gamma=2, adaptive=True),
        engine(target, DraftModelProposer(models["noisy"]), gamma=6, confidence=0.5),
    ):
        for prompt in PROMPTS:
            assert eng.generate(prompt, 33).token_ids == hf_greedy(target, prompt, 33, eos=None)


def test_adaptive_schedule_grows_on_full_acceptance(models):
    target = models["target"]
    eng = engine(target, DraftModelProposer(target), gamma=1, adaptive=True)
    seq = eng.start(PROMPTS[0], 30, SamplingParams())
    gammas = []
    for _ in range(3):
        gammas.append(seq.gamma)
        eng.step(seq)
    assert gammas == [1, 3, 5]


def test_confidence_stop_shortens_drafts(models):
    target = models["target"]
    full = engine(target, DraftModelProposer(models["noisy"]), gamma=6).generate(PROMPTS[3], 40).stats
    short = engine(target, DraftModelProposer(models["noisy"]), gamma=6, confidence=0.9).generate(PROMPTS[3], 40).stats
    assert short.drafted / short.rounds < full.drafted / full.rounds


def test_stats_are_consistent(models):
    target = models["target"]
    result = engine(target, DraftModelProposer(models["noisy"]), gamma=4).generate(PROMPTS[3], 50)
    s = result.stats
    assert s.emitted == len(result.token_ids) == 50
    assert s.accepted <= s.drafted and s.rounds <= s.emitted
    assert sum(s.accepted_per_position) == s.accepted and sum(s.drafted_per_position) == s.drafted
    assert s.mean_acceptance_length == pytest.approx(1 + s.accepted / s.rounds)
    assert s.emitted == s.accepted + s.rounds  # every round adds one target token
    assert s.draft_time_s > 0 and s.verify_time_s > 0 and s.total_time_s >= s.draft_time_s + s.verify_time_s
    assert 0 < s.acceptance_rate < 1  # the noisy draft agrees sometimes, not always
    assert 0 < s.rejections <= s.rounds
    assert s.per_token_acceptance == pytest.approx(s.accepted / (s.accepted + s.rejections))
    assert s.per_token_acceptance >= s.acceptance_rate


def test_target_only_drafts_nothing(models):
    target = models["target"]
    result = SpeculativeEngine(TargetVerifier(TargetRunner(target)), None, None, 256).generate(PROMPTS[0], 20)
    assert result.token_ids == hf_greedy(target, PROMPTS[0], 20, eos=None)
    assert result.stats.drafted == 0 and result.stats.rounds == 20


def test_generate_feeds_the_prompt_in_the_first_round(models):
    """A lone sequence runs no separate prefill: N tokens take N forwards, as transformers'
    generate does, the first one over the whole prompt."""
    target = models["target"]
    fed = []
    hook = target.register_forward_pre_hook(lambda m, args, kwargs: fed.append(kwargs["input_ids"].shape[-1]),
                                            with_kwargs=True)
    try:
        result = SpeculativeEngine(TargetVerifier(TargetRunner(target)), None, None, 256).generate(PROMPTS[3], 12)
    finally:
        hook.remove()
    assert result.token_ids == hf_greedy(target, PROMPTS[3], 12, eos=None)
    assert fed == [len(PROMPTS[3])] + [1] * 11


@pytest.mark.parametrize("drafter", ["noisy", "ngram"])
def test_seeded_sampling_is_reproducible(models, drafter):
    target = models["target"]
    proposer = NgramProposer() if drafter == "ngram" else DraftModelProposer(models[drafter])
    eng = engine(target, proposer, gamma=3)
    params = SamplingParams(temperature=1.0, top_k=20, seed=123)
    first = eng.generate(PROMPTS[0], 40, params).token_ids
    assert eng.generate(PROMPTS[0], 40, params).token_ids == first
    others = {tuple(eng.generate(PROMPTS[0], 40, SamplingParams(temperature=1.0, top_k=20, seed=s)).token_ids)
              for s in range(4)}
    assert len(others) > 1


@pytest.mark.parametrize(
    "prompt,max_new,match",
    [([], 5, "empty"), ([1, 2], 0, "max_new_tokens"), ([1, 2], 255, "context"), ([1] * 256, 1, "context")],
)
def test_bad_requests_are_rejected(models, prompt, max_new, match):
    eng = engine(models["target"], NgramProposer())
    with pytest.raises(InvalidRequest, match=match):
        eng.generate(prompt, max_new)


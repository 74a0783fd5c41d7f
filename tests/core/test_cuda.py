"""The GPU path (bf16 weights, CUDA generators). Skipped where no GPU is present; CI
machines have none, sessions lent a GPU run it there."""

import pytest
import torch
from tiny_models import noisy_copy, plain_logits, tiny

from services.core.draft_q import SparseQ, compact
from services.core.engine import SpeculativeEngine
from services.core.gamma import GammaSchedule
from services.core.proposers import DraftModelProposer, NgramProposer
from services.core.rejection import Randomness
from services.core.sampling import SamplingParams
from services.core.verifier import TargetVerifier
from services.core.target import TargetRunner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# bf16 is not in this list on purpose: scoring 5 positions at once and 1 at a time take
# different kernels, and in bf16 their rounding can flip near-tied argmaxes, so exact
# greedy identity is a fp32 property (as in every GPU spec-decode stack).
@pytest.mark.parametrize("dtype", [torch.float32])
def test_greedy_on_cuda_matches_target_only(dtype):
    target = tiny("llama", seed=0).to("cuda", dtype)
    draft = noisy_copy(tiny("llama", seed=0), 1, 0.5).to("cuda", dtype)
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7]
    plain = SpeculativeEngine(TargetVerifier(TargetRunner(target)), None, None, 256).generate(prompt, 40).token_ids
    for proposer in (DraftModelProposer(draft), NgramProposer(device="cuda")):
        engine = SpeculativeEngine(TargetVerifier(TargetRunner(target)), proposer, None, 256, GammaSchedule(4))
        assert engine.generate(prompt, 40).token_ids == plain


def test_bf16_speculative_decoding_runs_and_mostly_agrees():
    target = tiny("llama", seed=0).to("cuda", torch.bfloat16)
    draft = noisy_copy(tiny("llama", seed=0), 1, 0.5).to("cuda", torch.bfloat16)
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7]
    plain = SpeculativeEngine(TargetVerifier(TargetRunner(target)), None, None, 256).generate(prompt, 40).token_ids
    spec = SpeculativeEngine(TargetVerifier(TargetRunner(target)), DraftModelProposer(draft), None, 256, GammaSchedule(4))
    result = spec.generate(prompt, 40)
    assert len(result.token_ids) == 40 and result.stats.drafted > 0
    assert result.token_ids[:10] == plain[:10]


def test_seeded_sampling_on_cuda_is_reproducible():
    target = tiny("llama", seed=0).to("cuda", torch.bfloat16)
    draft = noisy_copy(tiny("llama", seed=0), 1, 0.5).to("cuda", torch.bfloat16)
    engine = SpeculativeEngine(TargetVerifier(TargetRunner(target)), DraftModelProposer(draft), None, 256, GammaSchedule(3))
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
    assert engine.generate([5, 6, 7], 30, params).token_ids == engine.generate([5, 6, 7], 30, params).token_ids


def test_compact_q_is_derived_bit_identically_on_cpu_and_cuda():
    """The drafter and the verifier may sit on different devices: q' from the wire form
    must be the same bits on both (integer weights, float64 division)."""
    q = compact(torch.randn(151_936).mul(6).softmax(-1))
    on_gpu = SparseQ.of(q.ids.cuda(), q.levels.cuda(), q.tail_weight.cuda(), q.vocab)
    assert torch.equal(on_gpu.probs.cpu(), q.probs) and torch.equal(on_gpu.tail.cpu(), q.tail)


def test_batched_acceptance_on_cuda_mixes_greedy_and_sampled_rows():
    target = tiny("llama", seed=0).to("cuda", torch.bfloat16)
    draft = noisy_copy(tiny("llama", seed=0), 1, 0.5).to("cuda", torch.bfloat16)
    engine = SpeculativeEngine(TargetVerifier(TargetRunner(target)), DraftModelProposer(draft), None, 256, GammaSchedule(4))
    params = [SamplingParams(), SamplingParams(temperature=0.7, top_k=20, seed=1), SamplingParams(temperature=1.0, seed=2)]
    seqs = [engine.start([5, 6, 7, 8], 24, p) for p in params]
    while not all(s.finished for s in seqs):
        live = [s for s in seqs if not s.finished]
        engine.verify_and_commit_batch(live, [engine.propose(s) for s in live])
    plain = SpeculativeEngine(TargetVerifier(TargetRunner(target)), None, None, 256).generate([5, 6, 7, 8], 24).token_ids
    assert seqs[0].generated[:8] == plain[:8]  # bf16: near-ties may flip later (see above)
    assert all(len(s.generated) == 24 for s in seqs)
    on_gpu = Randomness.draw([(1, 0), None], [3, 2], 3, "cuda")
    assert on_gpu.uniforms.device.type == "cuda"
    # Host streams: a stream resumed on a GPU replica draws what a CPU replica would.
    on_cpu = Randomness.draw([(1, 0), None], [3, 2], 3, "cpu")
    assert torch.equal(on_gpu.uniforms.cpu(), on_cpu.uniforms) and torch.equal(on_gpu.final.cpu(), on_cpu.final)


def test_the_paged_pool_on_cuda_gives_each_session_what_it_gets_alone():
    from services.core.target import Feed

    model = tiny("qwen2", seed=0).to("cuda")
    runner = TargetRunner(model, kv_cache_bytes=2**20)
    prefixes = [list(range(3, 3 + n)) for n in (5, 21, 0)]
    for i, prefix in enumerate(prefixes):
        if prefix:
            runner.forward([Feed(str(i), 0, prefix, 1)])
    feeds = [[7, 8, 9], [4], [11, 12]]
    got = runner.forward([Feed(str(i), len(p), f, len(f)) for i, (p, f) in enumerate(zip(prefixes, feeds))])
    for prefix, feed, logits in zip(prefixes, feeds, got):
        expected = plain_logits(model, prefix + feed)[-len(feed):]
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    blocks = [runner.export("1", 0, 16)]
    runner.prefill("3", list(range(3, 19)) + [5], blocks)
    (warm,) = runner.forward([Feed("3", 17, [6], 1)])
    torch.testing.assert_close(warm, plain_logits(model, list(range(3, 19)) + [5, 6])[-1:],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_medusa_trees_on_cuda(dtype):
    """Tree masks, tree acceptance and the heads on the GPU: fp32 is exact greedy; bf16
    runs the same path (near-tied argmaxes may flip, as for chains) and stays close."""
    from tiny_models import random_heads

    from services.core.head_proposers import MedusaProposer
    from services.core.tree import choice_tree, parse_choices

    target = tiny("llama", seed=0).to("cuda", dtype)
    heads = random_heads(tiny("llama", seed=0), 1).to("cuda", dtype)
    heads._target_head = [target.get_output_embeddings()]
    tree = choice_tree(parse_choices("0;1;2;0.0;0.1;1.0;0.0.0"))
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7]
    plain = SpeculativeEngine(TargetVerifier(TargetRunner(target)), None, None, 256).generate(prompt, 40).token_ids
    engine = SpeculativeEngine(TargetVerifier(TargetRunner(target)), MedusaProposer(heads, tree, "cuda"), None, 256,
                               GammaSchedule(8))
    result = engine.generate(prompt, 40)
    if dtype == torch.float32:
        assert result.token_ids == plain
    else:
        assert sum(a == b for a, b in zip(result.token_ids, plain)) >= 20
    sampled = engine.generate(prompt, 30, SamplingParams(temperature=0.8, seed=4)).token_ids
    assert sampled == engine.generate(prompt, 30, SamplingParams(temperature=0.8, seed=4)).token_ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mtp_trees_on_cuda(dtype):
    """MTP modules on the GPU (their caches, masks and the shared embedding/LM head in
    the target's dtype): fp32 is exact greedy; bf16 runs the same path and stays close."""
    from tiny_models import random_mtp

    from services.core.mtp_proposer import MtpProposer
    from services.core.tree import choice_tree, parse_choices

    target = tiny("llama", seed=0).to("cuda", dtype)
    mtp = random_mtp(target, 1).to("cuda", dtype)
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7]
    plain = SpeculativeEngine(TargetVerifier(TargetRunner(target)), None, None, 256).generate(prompt, 40).token_ids
    engine = SpeculativeEngine(TargetVerifier(TargetRunner(target)),
                               MtpProposer(mtp, choice_tree(parse_choices("0;1;0.0;0.1;0.0.0")), "cuda"), None, 256,
                               GammaSchedule(8))
    result = engine.generate(prompt, 40)
    assert result.stats.drafted > 0
    if dtype == torch.float32:
        assert result.token_ids == plain
    else:
        assert sum(a == b for a, b in zip(result.token_ids, plain)) >= 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eagle_trees_on_cuda(dtype):
    """An EAGLE-3 drafter on the GPU (its cache, the frontier masks, the draft vocabulary,
    the target's layer features in its dtype): fp32 is exact greedy; bf16 stays close."""
    from tiny_models import random_eagle

    from services.core.eagle_proposer import EagleProposer, EagleTree

    target = tiny("llama", seed=0, layers=4).to("cuda", dtype)
    drafter = random_eagle(target, 1, torch.arange(0, 96, 2)).to("cuda", dtype)
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7]
    plain = SpeculativeEngine(TargetVerifier(TargetRunner(target)), None, None, 256).generate(prompt, 40).token_ids
    engine = SpeculativeEngine(TargetVerifier(TargetRunner(target)),
                               EagleProposer(drafter, EagleTree(4, 3, 10), "cuda"), None, 256, GammaSchedule(8))
    result = engine.generate(prompt, 40)
    assert result.stats.drafted > 0
    if dtype == torch.float32:
        assert result.token_ids == plain
    else:
        assert sum(a == b for a, b in zip(result.token_ids, plain)) >= 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_speculation_cache_branches_on_cuda(dtype):
    """Branches drafted together in one batched forward a step, from forks of one
    session's KV on the GPU: in fp32 each is exactly a fresh draft after its outcome."""
    from services.core.pipeline import DraftSession

    draft = noisy_copy(tiny("llama", seed=0), 1, 0.3).to("cuda", dtype)
    for params in (SamplingParams(seed=0), SamplingParams(temperature=1.0, seed=3)):
        s = DraftSession(DraftModelProposer(draft), [5, 6, 7, 8], 60, params, 4, fanout=4)
        block = s.draft(0)
        branches = s.draft_branches()
        assert len(branches) > 1 and all(len(b.proposal) and b.proposal.tokens.is_cuda for b in branches)
        if dtype != torch.float32:
            continue  # batched and single-row bf16 kernels round differently
        for b in branches:
            fresh = DraftSession(DraftModelProposer(draft), [5, 6, 7, 8], 60, params, 4)
            fresh.committed += block.proposal.tokens.tolist()[: b.accepted] + [b.guess]
            assert fresh.draft(1).proposal.tokens.tolist() == b.proposal.tokens.tolist()


def test_suffix_decoding_on_cuda_matches_target_only():
    from services.core.suffix import SuffixProposer

    target = tiny("llama", seed=0).to("cuda")
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7]
    plain = SpeculativeEngine(TargetVerifier(TargetRunner(target)), None, None, 256).generate(prompt, 40).token_ids
    engine = SpeculativeEngine(TargetVerifier(TargetRunner(target)), SuffixProposer(device="cuda"), None, 256,
                               GammaSchedule(6))
    result = engine.generate(prompt, 40)
    assert result.token_ids == plain and result.stats.accepted > 0


def test_loading_on_cuda_turns_off_per_shape_attention_plans(tmp_path):
    """bf16 attention at a new length every step must not build a cuDNN plan each time
    (services/models/loading.py configure_cuda)."""
    from services.models.loading import load_model

    tiny("llama", seed=0).save_pretrained(tmp_path)
    torch.backends.cuda.enable_cudnn_sdp(True)
    model = load_model(str(tmp_path), "cuda", "bfloat16")
    assert not torch.backends.cuda.cudnn_sdp_enabled() and model.dtype == torch.bfloat16

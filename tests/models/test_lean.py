"""The lean decoder (services/models/lean.py) is a model's forward without transformers'
per-module machinery: through a draft's steps over its paged KV (core/paged_kv.py) and
a verifier's passes over the KV pool (core/target.py: in place, gathered,
trees) it must give transformers' logits and leave the same cache, on the families it
covers, with padding, feeds of several tokens and sliding windows; everything else
keeps transformers' forward."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from services.core.kv_pool import KVPool
from services.core.paged_kv import PagedKV, extend_paged
from services.core.target import FINAL, PRE_NORM, Feed, TargetRunner, layer_features
from services.models.attention import use_outrider_attention
from services.models import lean
from services.models.lean import lean_decoder, use_lean_decoding
from services.models.loading import load_model, resolve_paths
from services.models.shapes import random_model


def _model(shape: str, window: int | None = None, device: str = "cpu", dtype=torch.float32):
    if shape == "gpt2":  # learned positions, LayerNorm, Conv1D; attention scaled down by the layer's index too
        config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=4096, n_positions=512,
                            scale_attn_by_inverse_layer_idx=True)
        torch.manual_seed(0)
        return use_lean_decoding(use_outrider_attention(GPT2LMHeadModel(config)).eval().to(device, dtype))
    model = random_model(shape, layers=2, hidden=128, vocab=4096)
    if window is not None:  # a model built with this window (its layers read it at init)
        config = model.config
        config.sliding_window = window
        if shape == "qwen2":  # a sliding first layer, a full second one
            config.use_sliding_window, config.layer_types = True, ["sliding_attention", "full_attention"]
        windowed = type(model)(config)
        windowed.load_state_dict(model.state_dict())
        model = windowed.eval()
    return use_lean_decoding(model.to(device, dtype))


def _both(model, run):
    """``run(model)`` with the lean decoder, then with transformers' forward."""
    lean = run(model)
    decoder, model.lean_decoder = model.lean_decoder, None
    try:
        return lean, run(model)
    finally:
        model.lean_decoder = decoder


def _states(model, n: int) -> list[PagedKV]:
    pool = KVPool.for_model(model, 2**22)
    return [PagedKV(pool) for _ in range(n)]


def _extend(model, kv: PagedKV, tokens: list[int], logits_to_keep: int = 0) -> torch.Tensor:
    return extend_paged(model, [kv], [tokens], [logits_to_keep or len(tokens)])[0]


def _single(model):
    g = torch.Generator().manual_seed(1)
    (kv,) = _states(model, 1)
    out = [_extend(model, kv, torch.randint(2, 4096, (37,), generator=g).tolist(), logits_to_keep=2)]
    for token in (5, 9, 700):  # decode steps
        out.append(_extend(model, kv, [token], logits_to_keep=1))
    out.append(_extend(model, kv, [11, 12, 13]))  # a fed-back block: all its logits
    kv.truncate(30)  # a rollback, then the cache grows again from there
    out.append(_extend(model, kv, [14, 15], logits_to_keep=1))
    return out, kv


def _batch(model):
    g = torch.Generator().manual_seed(2)
    kvs = _states(model, 3)
    for kv, length in zip(kvs, (12, 29, 0)):  # ragged caches, one empty: left padding
        if length:
            _extend(model, kv, torch.randint(2, 4096, (length,), generator=g).tolist(), logits_to_keep=1)
    out = extend_paged(model, kvs, [[3, 4, 5], [6], [7, 8]], [2, 1, 2])  # ragged feeds: right padding
    out += extend_paged(model, kvs, [[9], [10], [11]], [1, 1, 1])
    return out, kvs


def _assert_same(lean, theirs):
    (lean_logits, lean_kv), (logits, kv) = lean, theirs
    for a, b in zip(lean_logits, logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    lean_kvs, kvs = (lean_kv, kv) if isinstance(kv, list) else ([lean_kv], [kv])
    for mine, ref in zip(lean_kvs, kvs):
        assert mine.tokens == ref.tokens
        a, b = mine.export(0, len(mine)), ref.export(0, len(ref))
        for x, y in zip(a.keys + a.values, b.keys + b.values):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,window", [("llama3", None), ("qwen2", None), ("qwen2", 8), ("mistral", 8), ("gpt2", None)])
def test_the_logits_and_cache_of_transformers_forward(shape, window):
    model = _model(shape, window)
    assert model.lean_decoder is not None
    _assert_same(*_both(model, _single))
    _assert_same(*_both(model, _batch))


# Every hidden state drafting heads read: Medusa's, MiMo's MTP's, EAGLE-3's layer inputs.
KINDS = (FINAL, PRE_NORM, layer_features([0, 1]))


def _verify_passes(model):
    """A verifier's passes: a lone session (read from the pool in place), then a batch
    of a tree row, a chain row and a second tree over different pasts (gathered, with
    the tree's 4-D masks), then target-only steps of the batch (2-D padding masks).
    Each pass's logits, then the hidden states of KINDS at every fed position."""
    g = torch.Generator().manual_seed(4)
    runner, hidden = TargetRunner(model, kv_cache_bytes=2**22), []

    def forward(feeds):  # a pass as the verifier runs it for heads, keeping the states too
        logits, states = runner.forward_with_hidden(feeds, KINDS)
        hidden.extend(state for kind in KINDS for state in states[kind])
        return logits

    prompts = [torch.randint(3, 4000, (n,), generator=g).tolist() for n in (23, 9, 14)]
    out = [forward([Feed("0", 0, prompts[0], 3)])[0]]
    for i, prompt in enumerate(prompts[1:], 1):
        runner.prefill(str(i), prompt[:-1], [])
    trees = [(-1, -1, 0, 0, 1, 2, 2, 5, -1), None, (-1, 0, -1, 1)]
    nodes = [torch.randint(3, 4000, (len(t) if t else 5,), generator=g).tolist() for t in trees]
    keep = [len(prompts[0]), len(prompts[1]) - 1, len(prompts[2]) - 1]
    fed = [[7] if i == 0 else prompts[i][-1:] for i in range(3)]
    out += forward([Feed(str(i), k, f + n, len(n) + 1, t)
                    for i, (k, f, n, t) in enumerate(zip(keep, fed, nodes, trees))])
    out += forward([Feed(str(i), k + 1, [9 + i], 1) for i, k in enumerate(keep)])
    # Chains of different lengths: the padded rows are left out of the token-wise work.
    out += forward([Feed(str(i), k + 2, f, len(f)) for i, (k, f) in enumerate(zip(keep, [[21, 22, 23, 24, 25], [26], [27, 28]]))])
    return out, hidden


def _ragged_chains(model):
    """Verify passes of chains of different lengths (a batch where few sessions draft),
    logits only: most of the rows of the padded layout are padding."""
    g = torch.Generator().manual_seed(5)
    runner = TargetRunner(model, kv_cache_bytes=2**22)
    for i, n in enumerate((31, 12, 20, 7)):
        runner.prefill(str(i), torch.randint(3, 4000, (n,), generator=g).tolist(), [])
    out = []
    for gammas in ((0, 0, 6, 0), (2, 0, 0, 1), (0, 3, 0, 0)):
        feeds = []
        for i, gamma in enumerate(gammas):
            tokens = torch.randint(3, 4000, (gamma + 1,), generator=g).tolist()
            feeds.append(Feed(str(i), len(runner.sessions[str(i)].tokens), tokens, len(tokens)))
        out += runner.forward(feeds)
    return out


def _ragged_trees(model):
    """Verify passes where a session or two draft a tree and the rest decode one token
    (4-D masks): most of the padded layout's rows are padding, and are left out."""
    g = torch.Generator().manual_seed(6)
    runner = TargetRunner(model, kv_cache_bytes=2**22)
    for i, n in enumerate((31, 12, 20, 7, 16)):
        runner.prefill(str(i), torch.randint(3, 4000, (n,), generator=g).tolist(), [])
    out = []
    medusa_like = (-1, -1, -1, 0, 0, 1, 3, 3, 5)  # three roots, branching under the first two
    for trees in ((None, medusa_like, None, None, None), ((-1, 0, 0), None, None, medusa_like, None)):
        feeds = []
        for i, tree in enumerate(trees):
            tokens = torch.randint(3, 4000, (1 + (len(tree) if tree else 0),), generator=g).tolist()
            feeds.append(Feed(str(i), len(runner.sessions[str(i)].tokens), tokens, len(tokens), tree))
        out += runner.forward(feeds)
    return out


@pytest.mark.parametrize("shape,window", [("llama3", None), ("qwen2", 8), ("mistral", 8), ("gpt2", None)])
def test_a_verifiers_passes_give_transformers_logits_and_hidden_states(shape, window):
    """The hidden states too: the lean decoder keeps them itself; transformers' forward
    is read through hooks on its modules."""
    model = _model(shape, window)
    (lean, lean_hidden), (theirs, their_hidden) = _both(model, _verify_passes)
    assert len(lean) == len(theirs) == 10
    for a, b in zip(lean, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(lean_hidden) == len(their_hidden) == 10 * len(KINDS)
    assert [h.shape for h in lean_hidden] == [h.shape for h in their_hidden]
    assert lean_hidden[-1].shape[-1] == 2 * model.config.hidden_size  # two layers' inputs, concatenated
    for a, b in zip(lean_hidden, their_hidden):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # FINAL is PRE_NORM normed: they are not the same tensor by mistake.
    assert not torch.allclose(lean_hidden[0], lean_hidden[1], atol=1e-3)


@pytest.mark.parametrize("shape,window", [("llama3", None), ("qwen2", 8), ("mistral", 8), ("gpt2", None)])
def test_a_pass_over_chains_of_different_lengths_gives_transformers_logits(shape, window):
    lean, theirs = _both(_model(shape, window), _ragged_chains)
    assert len(lean) == len(theirs) == 12 and [x.shape[0] for x in lean[:4]] == [1, 1, 7, 1]
    for a, b in zip(lean, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_sliding_window_is_applied_not_ignored():
    """The window of 8 must change what a 37-token context gives, or the case above
    would pass with a decoder that attends everywhere."""
    windowed, full = _model("mistral", 8), _model("mistral", 4096)
    full.load_state_dict(windowed.state_dict())
    assert not torch.allclose(_single(windowed)[0][-1], _single(full)[0][-1], atol=1e-3)


def test_the_bundled_draft_runs_it_bit_for_bit():
    draft = load_model(resolve_paths(None, None, None, None, None).draft, lean=True)
    assert draft.lean_decoder is not None
    lean, theirs = _both(draft, _single)
    assert all(torch.equal(a, b) for a, b in zip(lean[0], theirs[0]))


def test_fusing_leaves_the_models_own_forward_as_it_was():
    model = random_model("qwen2", layers=1, hidden=64, vocab=512)
    ids = torch.arange(2, 20)[None]
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        use_lean_decoding(model)
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_a_model_moved_after_its_decoder_was_made_is_refused_not_run_stale():
    model = _model("llama3").to(torch.float64)
    with pytest.raises(RuntimeError, match="use_lean_decoding again"):
        _extend(model, _states(model, 1)[0], [1, 2, 3])


def test_other_families_keep_transformers_forward():
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                            intermediate_size=64, vocab_size=300)).eval()
    assert lean_decoder(neox) is None
    gelu = random_model("llama3", layers=1, hidden=64, vocab=512)
    gelu.config.hidden_act = "gelu"
    assert lean_decoder(gelu) is None
    crossed = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, add_cross_attention=True))
    assert lean_decoder(crossed.eval()) is None
    # and such a model still drafts over its paged KV, on transformers' forward
    (kv,) = _states(use_lean_decoding(neox), 1)
    assert _extend(neox, kv, [1, 2, 3], logits_to_keep=1).shape == (1, 300)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", ["qwen2", "mistral", "gpt2"])
def test_bf16_on_a_gpu_matches_transformers(shape):
    """On CUDA a masked grouped-query pass repeats K/V for SDPA's fused kernels; bf16
    logits agree with transformers' to bf16's precision, in draft steps and in a
    verifier's passes over the pool."""
    model = _model(shape, 8 if shape == "mistral" else None, "cuda", torch.bfloat16)
    lean, theirs = _both(model, _batch)
    (verified, hidden), (verified_theirs, hidden_theirs) = _both(model, _verify_passes)
    for a, b in zip(lean[0] + verified + hidden, theirs[0] + verified_theirs + hidden_theirs):
        assert a.dtype == torch.bfloat16 and a.is_cuda
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("shape,window", [("llama3", None), ("qwen2", 8), ("gpt2", None)])
def test_a_tree_pass_of_few_real_rows_is_packed_and_gives_transformers_logits(shape, window, monkeypatch):
    packed = []
    init = lean._Packed.__init__
    monkeypatch.setattr(lean._Packed, "__init__", lambda self, real, device: packed.append(int(real.sum()))
                        or init(self, real, device))
    lean_out, theirs = _both(_model(shape, window), _ragged_trees)
    assert packed == [14, 17]  # real rows of 50: both passes packed
    assert len(lean_out) == len(theirs) == 10 and [x.shape[0] for x in lean_out[:5]] == [1, 10, 1, 1, 1]
    for a, b in zip(lean_out, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

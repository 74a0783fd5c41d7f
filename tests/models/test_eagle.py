"""EAGLE-3 drafters in the published layout: a fixture written the way yuhuili/EAGLE3-*
and SpecForge checkpoints are (Llama config with draft_vocab_size, fc / midlayer / norm /
lm_head / d2t / t2d) loads and computes what the layout means, checked against the
math written out by hand; ours round-trip through the same loader; targets with real
vocabularies keep greedy output exact."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tiny_models import hf_greedy, qwen2_real_shape, random_eagle, tiny

from services.core.eagle_proposer import EagleProposer, EagleTree
from services.core.engine import SpeculativeEngine
from services.core.gamma import GammaSchedule
from services.core.sampling import SamplingParams
from services.core.target import Feed, TargetRunner, layer_features
from services.core.verifier import TargetVerifier
from services.models.eagle import default_feature_layers, load_eagle
from services.models.heads import load_heads

H, V, K = 32, 96, 48


def published_fixture(folder, embed: bool = False, layer_ids=None, vocab: int = V, seed: int = 0):
    """A random EAGLE-3 drafter for an 8-layer, H=32 target, in the published layout."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    heads, kv, hd, inter = 4, 2, 8, 64
    state = {
        "fc.weight": rand(H, 3 * H),
        "midlayer.input_layernorm.weight": 1 + rand(H), "midlayer.hidden_norm.weight": 1 + rand(H),
        "midlayer.post_attention_layernorm.weight": 1 + rand(H),
        "midlayer.self_attn.q_proj.weight": rand(heads * hd, 2 * H),
        "midlayer.self_attn.k_proj.weight": rand(kv * hd, 2 * H),
        "midlayer.self_attn.v_proj.weight": rand(kv * hd, 2 * H),
        "midlayer.self_attn.o_proj.weight": rand(H, heads * hd),
        "midlayer.mlp.gate_proj.weight": rand(inter, H), "midlayer.mlp.up_proj.weight": rand(inter, H),
        "midlayer.mlp.down_proj.weight": rand(H, inter),
        "norm.weight": 1 + rand(H), "lm_head.weight": rand(K, H),
    }
    ids = torch.randperm(vocab, generator=g)[:K].sort().values
    state["d2t"] = ids - torch.arange(K)
    state["t2d"] = torch.zeros(vocab, dtype=torch.bool)
    state["t2d"][ids] = True
    if embed:
        state["embed_tokens.weight"] = rand(vocab, H)
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": H,
              "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv,
              "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": vocab,
              "draft_vocab_size": K, "max_position_embeddings": 256, "hidden_act": "silu",
              "tie_word_embeddings": False, "torch_dtype": "float16"}
    if layer_ids:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(layer_ids)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return state, ids


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def by_hand(state, embedded, features):
    """One row, no cache: attention over itself alone is its value (rope cancels)."""
    mid = lambda name: state[f"midlayer.{name}.weight"]  # noqa: E731
    f = features @ state["fc.weight"].T
    x = torch.cat([rms(embedded, mid("input_layernorm")), rms(f, mid("hidden_norm"))], -1)
    v = (x @ mid("self_attn.v_proj").T).view(2, 8).repeat_interleave(2, 0).flatten()  # GQA: 2 kv heads for 4
    h = f + v @ mid("self_attn.o_proj").T
    m = rms(h, mid("post_attention_layernorm"))
    out = h + (F.silu(m @ mid("mlp.gate_proj").T) * (m @ mid("mlp.up_proj").T)) @ mid("mlp.down_proj").T
    return rms(out, state["norm.weight"]) @ state["lm_head.weight"].T


@pytest.mark.parametrize("embed", [False, True], ids=["target-embedding", "own-embedding"])
def test_the_published_layout_loads_and_means_what_it_says(tmp_path, embed):
    target = tiny("llama", seed=0, layers=8)
    state, ids = published_fixture(tmp_path / "eagle", embed)
    drafter = load_heads(tmp_path / "eagle", target, "eagle")
    assert drafter.layers == (2, 4, 5)  # EAGLE-3's (2, N/2, N-3) when the config names none
    assert drafter.target_hidden == "layers:2,4,5" and drafter.draft_vocab.tolist() == ids.tolist()
    token, features = torch.tensor([[7]]), torch.randn(1, 1, 3 * H)
    embedded = (state["embed_tokens.weight"] if embed else target.get_input_embeddings().weight.detach())[7]
    with torch.no_grad():
        ours = drafter.logits(drafter.step(drafter.fuse(features), token, torch.tensor([[3]]), None,
                                           drafter.new_cache()))[0, 0]
    torch.testing.assert_close(ours, by_hand(state, embedded, features[0, 0]), rtol=1e-4, atol=1e-4)


def test_feature_layers_come_from_the_config(tmp_path):
    target = tiny("llama", seed=0, layers=8)
    published_fixture(tmp_path / "eagle", layer_ids=[1, 3, 6])
    assert load_eagle(tmp_path / "eagle", target).layers == (1, 3, 6)
    published_fixture(tmp_path / "bad", layer_ids=[1, 3, 8])
    with pytest.raises(ValueError, match="outside the target's 8"):
        load_eagle(tmp_path / "bad", target)


def test_drafters_that_do_not_fit_are_refused(tmp_path):
    published_fixture(tmp_path / "eagle", vocab=120)
    with pytest.raises(ValueError, match="vocabulary of 120"):
        load_eagle(tmp_path / "eagle", tiny("llama", seed=0, layers=8))
    (tmp_path / "medusa").mkdir()
    (tmp_path / "medusa" / "config.json").write_text(json.dumps({"kind": "medusa", "hidden_size": 32}))
    with pytest.raises(ValueError, match="not an EAGLE-3 drafter"):
        load_eagle(tmp_path / "medusa", tiny("llama", seed=0, layers=8))


def test_ours_save_in_the_published_layout_and_round_trip(tmp_path):
    target = tiny("qwen2", seed=0, layers=6)
    vocab = torch.arange(3, 96, 3)
    drafter = random_eagle(target, 1, vocab, tree=EagleTree(3, 2, 5))
    drafter.save(tmp_path / "eagle", dtype=torch.float32)
    config = json.loads((tmp_path / "eagle" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == len(vocab)
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == list(default_feature_layers(6)) == [1, 3, 5]
    loaded = load_eagle(tmp_path / "eagle", target)
    assert loaded.tree == EagleTree(3, 2, 5) and loaded.draft_vocab.tolist() == vocab.tolist()
    g, tokens, positions = torch.randn(1, 4, 32), torch.tensor([[5, 6, 7, 8]]), torch.arange(4)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(loaded.step(g, tokens, positions, None, None)),
                                   drafter.logits(drafter.step(g, tokens, positions, None, None)))


def test_layer_features_are_the_states_entering_those_layers():
    target = tiny("mistral", seed=0, layers=4)
    runner = TargetRunner(target, kv_cache_bytes=2**24)
    prompt = list(range(10, 30))
    kind = layer_features((0, 2, 3))
    _, states = runner.forward_with_hidden([Feed("s", 0, prompt, 1)], (kind, "final"))
    with torch.no_grad():
        ref = target(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(states[kind][0], torch.cat([ref[0], ref[2], ref[3]], -1)[0])
    torch.testing.assert_close(states["final"][0], ref[-1][0])
    with pytest.raises(ValueError, match="no decoder layer 4"):
        runner.forward_with_hidden([Feed("t", 0, prompt, 1)], (layer_features((1, 4)),))
    assert "t" not in runner.sessions  # refused before anything changed


def test_real_vocabulary_long_prompt_gqa_greedy_exact():
    """A Qwen2-shaped target with 151,936 tokens and a 1,500-token prompt; a drafter
    over a 32k draft vocabulary drafting EAGLE-2 trees."""
    target = qwen2_real_shape()
    drafter = random_eagle(target, 1, torch.randperm(151_936)[:32_768])
    prompt = torch.randint(0, 151_936, (1500,)).tolist()
    eng = SpeculativeEngine(TargetVerifier(TargetRunner(target, kv_cache_bytes=2**26)),
                            EagleProposer(drafter, EagleTree(4, 3, 10)), None, 4096, GammaSchedule(4))
    result = eng.generate(prompt, 24)
    assert result.token_ids == hf_greedy(target, prompt, 24, eos=None) and result.stats.drafted > 0
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3)  # sampled: the same stream reproduces
    sampled = eng.generate(prompt, 24, params)
    assert sampled.token_ids == eng.generate(prompt, 24, params).token_ids and sampled.stats.drafted > 0


def _through_the_modules(layer, embedded, feature, rope, mask, cache):
    """EagleLayer's forward as transformers' modules compute it (LlamaAttention, LlamaMLP)."""
    normed = layer.hidden_norm(feature)
    residual = normed if layer.norm_before_residual else feature
    x = torch.cat([layer.input_layernorm(embedded), normed], -1)
    x, _ = layer.self_attn(x, position_embeddings=rope, attention_mask=mask, cache=cache)
    h = residual + x
    return h + layer.mlp(layer.post_attention_layernorm(h))


def test_the_midlayers_plain_ops_are_transformers_modules_forward_and_train_alike():
    """The midlayer runs its attention and MLP as plain ops (a drafting step's host
    time): the same features and cache as the modules give, over a masked block and
    then single rows over the cache (grouped K/V heads), and the same gradients."""
    target = tiny("llama", seed=0, layers=8, hidden=H)
    drafter = random_eagle(target, seed=3)
    layer, g = drafter.midlayer, torch.Generator().manual_seed(5)
    assert layer.self_attn.config.num_key_value_heads < layer.self_attn.config.num_attention_heads
    caches = [drafter.new_cache(), drafter.new_cache()]
    n = 6
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    for block, positions, block_mask in ((n, torch.arange(n), mask), (1, torch.tensor([n]), None),
                                         (1, torch.tensor([n + 1]), None)):
        embedded, feature = torch.randn(1, block, H, generator=g), torch.randn(1, block, H, generator=g)
        rope = drafter.rotary(embedded, positions[None])
        ours = layer(embedded, feature, rope, block_mask, caches[0])
        theirs = _through_the_modules(layer, embedded, feature, rope, block_mask, caches[1])
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)
    grads = []
    for forward in (layer, lambda *args: _through_the_modules(layer, *args)):
        layer.zero_grad()
        embedded, feature = torch.randn(1, n, H, generator=torch.Generator().manual_seed(7)), torch.ones(1, n, H)
        forward(embedded, feature, drafter.rotary(embedded, torch.arange(n)[None]), mask, None).square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert any(grad.abs().sum() > 0 for grad in grads[0])

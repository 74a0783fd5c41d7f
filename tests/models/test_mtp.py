"""MTP modules: the cached, incremental path equals the teacher-forced one; our Hub
format round-trips; checkpoints that ship MTP weights (DeepSeek-V3 / GLM-4.5 and
Qwen3-Next layouts, made here as tiny random models) load from the target's own
safetensors and draft exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import hf_greedy, random_mtp, tiny, tiny_deepseek_v3

from services.core.engine import SpeculativeEngine
from services.core.errors import InvalidRequest
from services.core.gamma import GammaSchedule
from services.core.sampling import SamplingParams
from services.core.target import TargetRunner
from services.core.verifier import TargetVerifier
from services.models.heads import load_heads
from services.models.loading import load_model, resolve_paths
from services.models.mtp import MtpHeads, ships_mtp
from services.models.pair import head_proposer, load_pair_heads


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "deepseek-v3"])
def test_incremental_depths_equal_teacher_forcing(family):
    target = tiny_deepseek_v3(0) if family == "deepseek-v3" else tiny(family, seed=0)
    mtp = random_mtp(target, 3, num_modules=2)
    tokens = torch.randint(2, 96, (1, 30))
    with torch.no_grad():
        hidden = target.get_decoder()(tokens).last_hidden_state
        full = mtp.forward_train(hidden, tokens, 3)  # depth 2 reuses module 1
        level = hidden[0]
        for k in range(3):
            n, cache, outs = 30 - k - 1, mtp.new_cache(), []
            for a, b in [(0, 7), (7, 8), (8, 12), (12, n)]:  # a prefill, a decode, two rounds
                outs.append(mtp.run_depth(k, level[a:b], tokens[0, k + 1 + a : k + 1 + b], a, cache))
            level = torch.cat(outs)
            torch.testing.assert_close(mtp.logits(k, level), full[k][0], atol=1e-5, rtol=1e-5)
    mtp.truncate(cache, 5)
    assert cache.get_seq_length() == 5


def test_saved_modules_load_by_path_and_refuse_another_kind(tmp_path):
    target = tiny("llama", seed=0)
    mtp = random_mtp(target, 1)
    mtp.save(tmp_path / "target-mtp")
    loaded = load_heads(tmp_path / "target-mtp", target, "mtp")
    state = load_file(tmp_path / "target-mtp" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert not any("embed" in k or "lm_head" in k for k in state)  # shared with the target, not saved
    assert isinstance(loaded, MtpHeads) and loaded.config.kind == "mtp"
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, mtp.state_dict()[name].to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="expected medusa"):
        load_heads(tmp_path / "target-mtp", target, "medusa")


def save_with_mtp(root, layout: str, family: str = "llama"):
    """A tiny target saved with one MTP module in a shipped layout, and those weights."""
    target = tiny_deepseek_v3(0) if family == "deepseek-v3" else tiny(family, seed=0)
    mtp = random_mtp(target, 5, num_modules=1)
    if layout in ("qwen3-next", "mimo"):
        mtp.carry_normed = True
    target.save_pretrained(root)
    ours = {k: v.contiguous() for k, v in mtp.state_dict().items()}
    n = target.config.num_hidden_layers
    if layout == "deepseek-v3":
        names = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "norm": "shared_head.norm", "block": ""}
        prefix = f"model.layers.{n}."
        extra = {prefix + "embed_tokens.weight": target.get_input_embeddings().weight.detach().clone(),
                 prefix + "shared_head.head.weight": target.get_output_embeddings().weight.detach().clone()}
    elif layout == "qwen3-next":
        names = {"enorm": "pre_fc_norm_embedding", "hnorm": "pre_fc_norm_hidden", "eh_proj": "fc", "norm": "norm",
                 "block": "layers.0."}
        prefix, extra = "mtp.", {}
    else:  # MiMo: [hidden; embedding] into its projection
        names = {"enorm": "token_layernorm", "hnorm": "hidden_layernorm", "eh_proj": "input_proj",
                 "norm": "final_layernorm", "block": ""}
        prefix, extra = "model.mtp_layers.0.", {}
    shipped = dict(extra)
    for key, value in ours.items():
        part, rest = key.removeprefix("layers.0.").split(".", 1)
        if layout == "mimo" and part == "eh_proj":
            value = torch.cat(value.chunk(2, dim=1)[::-1], dim=1).contiguous()
        shipped[prefix + (names[part] + rest if part == "block" else f"{names[part]}.{rest}")] = value
    weights = load_file(root / "model.safetensors")
    save_file({**weights, **shipped}, root / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (root / "config.json").write_text(json.dumps(config))
    return mtp


@pytest.mark.parametrize("layout,family", [("deepseek-v3", "llama"), ("qwen3-next", "llama"), ("mimo", "qwen2")])
def test_shipped_mtp_weights_load_from_the_target_checkpoint(tmp_path, layout, family):
    want = save_with_mtp(tmp_path / "target", layout, family)
    target = load_model(str(tmp_path / "target"), dtype="float32")  # the extra keys are not the target's
    assert ships_mtp(str(tmp_path / "target"))
    paths = resolve_paths(str(tmp_path / "target"), str(tmp_path / "target"))
    assert paths.mtp is None  # nothing beside it: the checkpoint's own modules are used
    mtp = load_pair_heads(paths, "mtp", target)
    assert mtp.config.num_heads == 1 and mtp.carry_normed == (layout != "deepseek-v3")
    assert mtp.target_hidden == ("pre_norm" if layout == "mimo" else "final")
    for name, value in mtp.state_dict().items():
        torch.testing.assert_close(value, want.state_dict()[name])
    eng = SpeculativeEngine(TargetVerifier(TargetRunner(target, kv_cache_bytes=2**24)), head_proposer(mtp, "0;0.0;1"),
                            None, 256, GammaSchedule(4))
    result = eng.generate([5, 6, 7, 8, 9], 24)
    assert result.token_ids == hf_greedy(target, [5, 6, 7, 8, 9], 24, eos=None) and result.stats.drafted > 0


def test_a_target_without_mtp_weights_is_refused_with_the_way_out(tmp_path):
    target = tiny("llama", seed=0)
    target.save_pretrained(tmp_path / "plain")
    assert not ships_mtp(str(tmp_path / "plain"))
    with pytest.raises(InvalidRequest, match="build-heads --kind mtp"):
        load_pair_heads(resolve_paths(str(tmp_path / "plain")), "mtp", target)
    with pytest.raises(ValueError, match="rotary layers"):
        random_mtp(tiny("gpt2", seed=0), 0)


def test_mimo_modules_draft_from_the_state_before_the_final_norm(tmp_path):
    save_with_mtp(tmp_path / "target", "mimo", "qwen2")
    target = load_model(str(tmp_path / "target"), dtype="float32")
    mtp = load_pair_heads(resolve_paths(str(tmp_path / "target")), "mtp", target)
    eng = SpeculativeEngine(TargetVerifier(TargetRunner(target, kv_cache_bytes=2**24)), head_proposer(mtp, "0;0.0"),
                            None, 256, GammaSchedule(4))
    prompt = [5, 6, 7, 8, 9, 10, 11]
    seq = eng.start(prompt, 12, SamplingParams())
    eng.prefill(seq)
    eng.verify_and_commit(seq, eng.propose(seq))
    drafts = eng.propose(seq).tokens.tolist()
    captured = []
    hook = target.get_decoder().norm.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    with torch.no_grad():
        target(input_ids=torch.tensor([seq.committed[:-1]]))
        hook.remove()
        logits = mtp.forward_train(captured[0], torch.tensor([seq.committed + drafts]), 2)
    assert drafts == [int(logits[k][0, len(seq.committed) - 2].argmax()) for k in range(2)]
    eng.release(seq)


def test_deepseek_v3_checkpoints_load_their_moe_mtp_block(tmp_path):
    """A real DeepSeek-V3 layout: the module's block is a MoE layer (experts, shared
    experts, router), loaded by name. (A DeepSeek-V3 target itself cannot be served
    yet: the KV pool has no MLA layout, whose keys and values differ in width.)"""
    want = save_with_mtp(tmp_path / "target", "deepseek-v3", "deepseek-v3")
    target = load_model(str(tmp_path / "target"), dtype="float32")
    mtp = load_pair_heads(resolve_paths(str(tmp_path / "target")), "mtp", target)
    assert type(mtp.layers[0].block.mlp).__name__ == "DeepseekV3MoE"
    assert any("experts" in name for name in mtp.state_dict())
    for name, value in mtp.state_dict().items():
        torch.testing.assert_close(value, want.state_dict()[name])


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "deepseek-v3"])
def test_llama_shaped_blocks_run_as_plain_ops_with_the_modules_results(family, monkeypatch):
    """A Llama-shaped block runs its attention and MLP as plain ops (models/lean.py); a
    DeepSeek-V3 MoE block runs its module. Either way the depths' logits, cached and
    teacher-forced, and the gradients equal those of transformers' modules."""
    from services.models import mtp as mtp_module

    target = tiny_deepseek_v3(0) if family == "deepseek-v3" else tiny(family, seed=0)
    mtp = random_mtp(target, 3, num_modules=2)
    assert mtp_module.plain_layer(mtp.layers[0].block) == mtp.layers[0].plain == (family != "deepseek-v3")
    tokens = torch.randint(2, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    hidden = target.get_decoder()(tokens).last_hidden_state.detach()

    def run():
        mtp.zero_grad()
        trained = mtp.forward_train(hidden, tokens, 2)
        sum(out.square().mean() for out in trained).backward()
        grads = [p.grad.clone() for p in mtp.parameters() if p.grad is not None]
        with torch.no_grad():
            cache = mtp.new_cache()
            cached = [mtp.run_depth(0, hidden[0, a:b], tokens[0, 1 + a : 1 + b], a, cache) for a, b in [(0, 9), (9, 10)]]
        return [t.detach() for t in trained] + cached, grads

    plain, plain_grads = run()
    for module in mtp.layers:
        monkeypatch.setattr(module, "plain", False)
    modules, module_grads = run()
    assert len(plain_grads) == len(module_grads) > 0
    for a, b in zip(plain + plain_grads, modules + module_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

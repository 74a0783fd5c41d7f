"""MTP modules (DeepSeek-V3 multi-token prediction) on a frozen target, and their
checkpoint layouts.

A module is RMSNorm(embedding) and RMSNorm(hidden), concatenated, projected 2H -> H,
one decoder block of the target's own family (built from its config, so the block's
weights load as the checkpoint names them), and a final norm before the target's LM
head. The embedding and the LM head are the target's, shared and never saved.

Our Hub format (``outrider build-heads --kind mtp``): ``config.json`` (HeadsConfig,
kind "mtp") and ``layers.{k}.{enorm,hnorm,eh_proj,block.*,norm}`` in bf16 safetensors.
Checkpoints that ship MTP weights load straight from the target's own safetensors
(``CHECKPOINT_LAYOUTS``): DeepSeek-V3 and GLM-4.5 (``model.layers.{N+k}.*``),
Qwen3-Next (``mtp.*``, zero-centred norms, which its own norm class applies) and MiMo
(``model.mtp_layers.{k}.*``: reads the target's state before its final norm and
concatenates [hidden; embedding], which loading reorders to ours).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.target import FINAL, PRE_NORM
from .heads import DraftHeads, HeadsConfig, OwnKV
from .lean import attention, gated_mlp, plain_layer


def decoder_parts(target):
    """(decoder layer class, norm class, rotary embedding) of a target with rotary
    decoder layers (Llama, Qwen2, Mistral, DeepSeek, Qwen3-Next families)."""
    decoder = target.get_decoder()
    layers, norm, rotary = (getattr(decoder, name, None) for name in ("layers", "norm", "rotary_emb"))
    if layers is None or norm is None or rotary is None:
        raise ValueError(f"MTP modules need a decoder with rotary layers (Llama, Qwen2, Mistral families); "
                         f"{type(target).__name__} has none")
    return type(layers[0]), type(norm), rotary


class MtpModule(nn.Module):
    def __init__(self, text_config, layer_cls, norm_cls):
        super().__init__()
        H, eps = text_config.hidden_size, getattr(text_config, "rms_norm_eps", 1e-6)
        self.enorm, self.hnorm, self.norm = norm_cls(H, eps=eps), norm_cls(H, eps=eps), norm_cls(H, eps=eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        # Built as the target's last layer, so that a family whose layer kind follows the
        # index (DeepSeek-V3's MoE after the first dense layers) builds the kind its
        # checkpoints ship; then re-indexed to slot 0 of the depth's own one-layer cache.
        self.block = layer_cls(text_config, layer_idx=text_config.num_hidden_layers - 1)
        for part in self.block.modules():
            if hasattr(part, "layer_idx"):
                part.layer_idx = 0
        # Llama-shaped: the block's parts run as plain ops (models/lean.py); MoE blocks run their module.
        self.plain = plain_layer(self.block)

    def combine(self, embedded: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(hidden)], -1))


class MtpHeads(OwnKV, DraftHeads):
    """D modules; depth k >= D reuses the last one (see core/mtp_proposer.py)."""

    def __init__(self, config: HeadsConfig, target, carry_normed: bool = False, target_hidden: str = FINAL,
                 initialize: bool = True):
        super().__init__()
        self.config = config
        # Qwen3-Next and MiMo carry (and feed the LM head) the normed output; DeepSeek the block's.
        self.carry_normed = carry_normed
        # The target's state depth 1 reads: the final (normed) one, or before its norm (MiMo).
        self.target_hidden = target_hidden
        text = target.config.get_text_config(decoder=True)
        layer_cls, norm_cls, rotary = decoder_parts(target)
        self.layers = nn.ModuleList(MtpModule(text, layer_cls, norm_cls) for _ in range(config.num_heads))
        if initialize and hasattr(target, "_init_weights"):  # the family's init (some layers allocate with torch.empty)
            with torch.no_grad():
                for part in self.layers.modules():
                    target._init_weights(part)
        self._init_draft_vocab(config)
        # Lists: the target's parts are used, never trained nor saved with the modules.
        self._shared = [target.get_input_embeddings(), target.get_output_embeddings(), rotary]

    def module(self, depth: int) -> MtpModule:
        return self.layers[min(depth, len(self.layers) - 1)]

    def block_output(self, depth: int, x: torch.Tensor, positions: torch.Tensor, mask=None, cache=None) -> torch.Tensor:
        """x [B, n, H] after eh_proj -> the carried state [B, n, H]."""
        module = self.module(depth)
        block, rope = module.block, self._shared[2](x, positions)
        if module.plain:
            # With ``mask`` None and no cache (training) the block is causal, as its module is.
            if mask is None and cache is None and x.shape[1] > 1:
                mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()[None, None]
            h = x + attention(block.self_attn, block.input_layernorm(x), rope, mask, cache, 0)
            out = h + gated_mlp(block.mlp, block.post_attention_layernorm(h))
        else:
            out = block(x, attention_mask=mask, position_ids=positions, cache=cache, use_cache=cache is not None,
                        position_embeddings=rope)
            out = out[0] if isinstance(out, tuple) else out
        return module.norm(out) if self.carry_normed else out

    def run_depth(self, depth: int, hidden: torch.Tensor, tokens: torch.Tensor, first: int, cache) -> torch.Tensor:
        """hidden [n, H] at positions first.., tokens [n] -> [n, H]; appends n entries to cache."""
        n, past = len(tokens), cache.get_seq_length()
        x = self.module(depth).combine(self._shared[0](tokens), hidden.to(self.dtype))[None]  # [1, n, H]
        positions = torch.arange(first, first + n, device=x.device)[None]
        mask = None
        if n > 1:  # causal over the new rows, everything cached before them visible
            keys = torch.arange(past + n, device=x.device)
            allowed = keys[None, :] <= past + torch.arange(n, device=x.device)[:, None]
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(
                ~allowed, torch.finfo(x.dtype).min)[None, None]
        return self.block_output(depth, x, positions, mask, cache)[0]

    def logits(self, depth: int, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., V] (V: the draft vocabulary's size if set)."""
        return self.project(hidden if self.carry_normed else self.module(depth).norm(hidden), self._shared[1])

    def forward_train(self, hidden0: torch.Tensor, tokens: torch.Tensor, depths: int | None = None) -> list[torch.Tensor]:
        """Teacher-forced over whole windows: hidden0 [B, T', H] (the target's at
        positions 0..T'-1), tokens [B, T] (T >= T'). Depth k's logits [B, n_k, V] at
        positions j predict x_{j+k+2}; n_k = min(n_{k-1}, T-k-1), n_{-1} = T'."""
        out, h = [], hidden0.to(self.dtype)
        T = tokens.shape[1]
        for k in range(depths or len(self.layers)):
            n = min(h.shape[1], T - k - 1)
            x = self.module(k).combine(self._shared[0](tokens[:, k + 1 : k + 1 + n]), h[:, :n])
            positions = torch.arange(n, device=x.device)[None].expand(len(x), n)
            h = self.block_output(k, x, positions)  # no mask, no cache: the block's causal attention
            out.append(self.logits(k, h))
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].eh_proj.weight.dtype


def init_from_target(heads: MtpHeads, target) -> None:
    """A trainable start: each block a copy of the target's last layer, the projection
    passing the hidden state through (the embedding half at zero)."""
    last = target.get_decoder().layers[-1].state_dict()
    H = heads.config.hidden_size
    with torch.no_grad():
        for module in heads.layers:
            module.block.load_state_dict(last)
            module.eh_proj.weight.zero_()
            module.eh_proj.weight[:, H:].copy_(torch.eye(H))


@dataclass(frozen=True)
class Layout:
    """Where a family's checkpoint keeps MTP module k, and how its names map to ours."""

    name: str
    prefix: str  # "{k}" = the module's index; "{n}" = the target's num_hidden_layers
    renames: dict  # checkpoint name (after the prefix) -> ours; unlisted names go to block.*
    skip: tuple = ()  # shared with the target, not loaded
    carry_normed: bool = False
    single: bool = False  # one module holding all the MTP layers (Qwen3-Next): one is supported
    hidden_first: bool = False  # the projection reads [hidden; embedding] (MiMo), not [embedding; hidden]
    target_hidden: str = FINAL


CHECKPOINT_LAYOUTS = (
    Layout("deepseek-v3", "model.layers.{n+k}.", {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj",
                                                  "shared_head.norm": "norm"},
           skip=("embed_tokens", "shared_head.head")),
    Layout("qwen3-next", "mtp.", {"fc": "eh_proj", "pre_fc_norm_embedding": "enorm", "pre_fc_norm_hidden": "hnorm",
                                  "norm": "norm", "layers.0": "block"}, carry_normed=True, single=True),
    Layout("mimo", "model.mtp_layers.{k}.", {"token_layernorm": "enorm", "hidden_layernorm": "hnorm",
                                             "input_proj": "eh_proj", "final_layernorm": "norm"},
           carry_normed=True, hidden_first=True, target_hidden=PRE_NORM),
)


def checkpoint_tensors(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for a folder holding one file or a sharded index."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    single = folder / "model.safetensors"
    if not single.exists():
        return {}
    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}


def find_layout(names, num_layers: int) -> tuple[Layout, int] | None:
    """The layout whose first module is present, and how many modules it has."""
    for layout in CHECKPOINT_LAYOUTS:
        count = 0
        while any(name.startswith(module_prefix(layout, num_layers, count)) for name in names):
            count += 1
            if layout.single:
                break
        if count:
            return layout, count
    return None


def module_prefix(layout: Layout, num_layers: int, k: int) -> str:
    return layout.prefix.replace("{n+k}", str(num_layers + k)).replace("{k}", str(k))


def ships_mtp(target: str) -> bool:
    """Whether a local target checkpoint holds MTP modules in a known layout."""
    folder = Path(target)
    if not (folder / "config.json").is_file():
        return False
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)
    return find_layout(checkpoint_tensors(folder), int(config.get("num_hidden_layers", 0))) is not None


def load_checkpoint_mtp(folder: Path, target) -> MtpHeads:
    """MTP modules from a target checkpoint that ships them (see CHECKPOINT_LAYOUTS)."""
    from safetensors import safe_open

    text = target.config.get_text_config(decoder=True)
    files = checkpoint_tensors(folder)
    found = find_layout(files, text.num_hidden_layers)
    if found is None:
        raise ValueError(f"{folder}: no MTP weights in a known layout ({', '.join(l.name for l in CHECKPOINT_LAYOUTS)})")
    layout, count = found
    if layout.single and any(re.match(r"mtp\.layers\.[1-9]", name) for name in files):
        raise ValueError(f"{folder}: an MTP module of several layers ({layout.name}); one layer is supported")
    vocab = target.get_output_embeddings().weight.shape[0]
    config = HeadsConfig(kind="mtp", hidden_size=text.hidden_size, vocab_size=vocab, num_heads=count,
                         target=str(folder), tree_choices="")
    heads = MtpHeads(config, target, carry_normed=layout.carry_normed, target_hidden=layout.target_hidden,
                     initialize=False)  # every weight is loaded below (checked)
    state = {}
    for k in range(count):
        prefix = module_prefix(layout, text.num_hidden_layers, k)
        for name, file in files.items():
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if any(rest.startswith(s + ".") for s in layout.skip):
                continue
            head = next((old for old in layout.renames if rest.startswith(old + ".")), None)
            ours = layout.renames[head] + rest[len(head):] if head else "block." + rest
            with safe_open(file, "pt") as f:
                tensor = f.get_tensor(name)
            if layout.hidden_first and ours == "eh_proj.weight":  # to our [embedding; hidden] order
                tensor = torch.cat(tensor.chunk(2, dim=1)[::-1], dim=1)
            state[f"layers.{k}.{ours}"] = tensor
    missing, unexpected = heads.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: {layout.name} MTP weights do not fit this target "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    return heads.to(device=target.device, dtype=target.dtype).eval()

"""Drafting heads attached to a target: Medusa heads and MTP modules (models/mtp.py),
saved in Hub format.

A heads folder holds ``config.json`` (``HeadsConfig``) and ``model.safetensors``; it
loads by path or Hub id (``load_heads``). Heads never hold the target: the target's
LM head is passed in when they are built, and when ``share_lm_head`` is set it is
used as is (frozen, not saved), which keeps Medusa heads for a 8k-vocabulary target
at a few MB instead of 4M parameters per head.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.tree import choice_tree, parse_choices

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
# A default before a tree is tuned for a target: top-4 at depth 1 narrowing to 1 at depth 4.
DEFAULT_CHOICES = "0;1;2;3;0.0;0.1;1.0;0.0.0;0.1.0;0.0.0.0"
# MTP's: its depths see the drafted tokens before them, so a narrower, deeper start.
MTP_DEFAULT_CHOICES = "0;1;0.0;0.1;0.0.0"
KINDS = ("medusa", "mtp", "eagle")


class HeadsConfig(BaseModel):
    kind: Literal["medusa", "mtp"] = "medusa"
    hidden_size: int
    vocab_size: int
    num_heads: int = Field(4, ge=1, le=8)  # Medusa heads, or MTP modules (deeper MTP depths reuse the last)
    num_layers: int = Field(1, ge=1, le=4)  # residual blocks per head
    share_lm_head: bool = True  # use the target's LM head (frozen) instead of one per head
    tree_choices: str = ""  # the default tree ("0;1;0.0": paths of candidate ranks); "" = DEFAULT_CHOICES
    target: str = ""  # what they were trained on (a name, for the record)
    # Candidates come from this many of the target's most frequent tokens (saved with the
    # weights as ``draft_vocab``); 0 = the whole vocabulary. See DraftHeads.
    draft_vocab_size: int = Field(0, ge=0)

    def tree(self):
        if self.kind == "mtp":
            return choice_tree(parse_choices(self.tree_choices or MTP_DEFAULT_CHOICES))
        if not self.tree_choices:
            return choice_tree(parse_choices(DEFAULT_CHOICES)).prune(self.num_heads)
        tree = choice_tree(parse_choices(self.tree_choices))
        if tree.shape.max_depth > self.num_heads:
            raise ValueError(f"tree choices reach depth {tree.shape.max_depth} but there are {self.num_heads} heads")
        return tree


class ResBlock(nn.Module):
    """x + SiLU(W x + b), W = 0 at first: a new head starts as the target's LM head."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class OwnKV:
    """Drafters with their own KV cache (MTP depths, EAGLE's layer): transformers' cache,
    cropped back to the committed positions after each round's frontier."""

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()

    def truncate(self, cache, length: int) -> None:
        drop = cache.get_seq_length() - length
        if drop > 0:
            cache.crop(-drop)  # (transformers 5: a negative count removes that many)


class DraftHeads(nn.Module):
    """What Medusa heads and MTP modules share: the target's LM head, optionally
    restricted to a draft vocabulary, and saving in Hub format.

    A draft vocabulary (frequency-ranked drafting, as FR-Spec and EAGLE-3's reduced
    vocabularies) projects onto the target's K most frequent tokens only: at batch 1
    the LM head is the biggest read of a draft step (8,192 x 512 here, 128k x 4,096 for
    Llama 3), and a token outside it is rarely a head's right answer. Lossless either
    way: the target verifies every candidate."""

    def _init_draft_vocab(self, config: HeadsConfig) -> None:
        size = config.draft_vocab_size
        self.register_buffer("draft_vocab", torch.zeros(size, dtype=torch.long) if size else None)
        self._rows = None  # (weight, vocab) -> the LM head's rows for the draft vocabulary

    def set_draft_vocab(self, ids: torch.Tensor | None) -> None:
        if ids is not None and getattr(self, "lm_heads", None) is not None:
            raise ValueError("a draft vocabulary needs heads that share the target's LM head")
        self.draft_vocab = None if ids is None else ids.to(device=self.draft_device, dtype=torch.long)
        self.config = self.config.model_copy(update={"draft_vocab_size": 0 if ids is None else len(ids)})
        self._rows = None

    @property
    def draft_device(self) -> torch.device:
        return next(self.parameters()).device

    def project(self, x: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """[..., H] -> logits over the draft vocabulary (or all of it)."""
        x = x.to(head.weight.dtype)
        if self.draft_vocab is None:
            return head(x)
        weight = head.weight
        if self._rows is None or self._rows[0] is not weight or self._rows[1].device != weight.device:
            self._rows = (weight, weight[self.draft_vocab.to(weight.device)].contiguous())
        return nn.functional.linear(x, self._rows[1])

    def candidates(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """The top-k token ids of ``project``'s logits [..., V'] -> [..., k]."""
        top = logits.topk(k, dim=-1).indices
        return top if self.draft_vocab is None else self.draft_vocab.to(top.device)[top]

    def save(self, folder: Path, dtype: torch.dtype = torch.bfloat16) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous()
                 for k, v in self.state_dict().items()}
        save_file(state, folder / WEIGHTS)
        (folder / CONFIG).write_text(self.config.model_dump_json(indent=2) + "\n")


class MedusaHeads(DraftHeads):
    """K heads on the target's final hidden state; head k predicts the token k+2 ahead."""

    def __init__(self, config: HeadsConfig, target_lm_head: nn.Module):
        super().__init__()
        self.config = config
        if config.draft_vocab_size and not config.share_lm_head:
            raise ValueError("a draft vocabulary needs heads that share the target's LM head")
        self._init_draft_vocab(config)
        H, V = config.hidden_size, config.vocab_size
        self.blocks = nn.ModuleList(
            nn.Sequential(*(ResBlock(H) for _ in range(config.num_layers))) for _ in range(config.num_heads))
        if config.share_lm_head:
            self.lm_heads = None
            self._target_head = [target_lm_head]  # a list: not a submodule, so never trained nor saved
        else:
            self.lm_heads = nn.ModuleList(nn.Linear(H, V, bias=False) for _ in range(config.num_heads))
            with torch.no_grad():
                for head in self.lm_heads:
                    head.weight.copy_(target_lm_head.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., K, V] (V: the draft vocabulary's size if set)."""
        x = torch.stack([block(hidden) for block in self.blocks], -2)  # [..., K, H]
        if self.lm_heads is None:
            # One matmul through the shared head: at batch 1 the LM head is read from
            # memory once a round, not once per head (on this CPU 10.8 -> 6.6 ms a round with 4 heads).
            return self.project(x, self._target_head[0])
        return torch.stack([head(x[..., k, :]) for k, head in enumerate(self.lm_heads)], -2)


def resolve(path_or_id: str | Path) -> Path:
    """A local folder as is; anything else is a Hub repo id, downloaded (and cached)."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    # *.safetensors and the index: a model that ships MTP weights in its own (sharded) checkpoint.
    return Path(snapshot_download(str(path_or_id), allow_patterns=[CONFIG, "*.safetensors", "model.safetensors.index.json"]))


def load_heads(path_or_id: str | Path, target, kind: str = "medusa"):
    """Heads of ``kind`` for ``target`` (a loaded causal LM), on its device and in its
    dtype. MTP modules also load from a target checkpoint that ships them; EAGLE-3
    drafters are in their published layout (models/eagle.py)."""
    folder = resolve(path_or_id)
    if kind == "eagle":
        from .eagle import load_eagle

        return load_eagle(folder, target)
    raw = json.loads((folder / CONFIG).read_text())
    if kind == "mtp" and "kind" not in raw:  # a model's own config: its checkpoint's MTP weights
        from .mtp import load_checkpoint_mtp

        return load_checkpoint_mtp(folder, target)
    config = HeadsConfig.model_validate(raw)
    if config.kind != kind:
        raise ValueError(f"{folder}: heads of kind {config.kind!r}, expected {kind}")
    text = target.config.get_text_config(decoder=True)
    if (config.hidden_size, config.vocab_size) != (text.hidden_size, target.get_output_embeddings().weight.shape[0]):
        raise ValueError(f"{folder}: heads for hidden {config.hidden_size} / vocab {config.vocab_size} do not fit "
                         f"this target (hidden {text.hidden_size}, vocab {target.get_output_embeddings().weight.shape[0]})")
    if kind == "mtp":
        from .mtp import MtpHeads

        heads = MtpHeads(config, target, initialize=False)  # every weight is loaded below (strict)
    else:
        heads = MedusaHeads(config, target.get_output_embeddings())
    heads.load_state_dict(load_file(folder / WEIGHTS))
    return heads.to(device=target.device, dtype=target.dtype).eval()

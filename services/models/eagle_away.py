"""An EAGLE-3 drafter away from its target (``eagle.placement: drafter``): a draft
worker loads the drafter and, of the target, only what drafting reads of it: its config
and its input embedding (the drafter embeds the tokens it is fed with the target's own
table unless it ships one). The embedding is read out of the target's checkpoint alone:
one tensor from one safetensors shard, not the whole model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from .eagle import Eagle3Drafter, load_eagle
from .heads import resolve
from .loading import DTYPES, default_dtype, load_config

INDEX = "model.safetensors.index.json"


class TargetInputs:
    """What an EAGLE-3 drafter reads of its target: its config and input embedding."""

    def __init__(self, config, embedding: nn.Embedding):
        self.config, self.embedding = config, embedding

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def get_output_embeddings(self) -> nn.Embedding:
        return self.embedding  # only its row count is read: the vocabulary

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device


def embedding_name(config, trust_remote_code: bool = False) -> str:
    """The checkpoint name of the model's input embedding, from a weightless copy."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    weight = model.get_input_embeddings().weight
    return next(name for name, param in model.named_parameters() if param is weight)


def _shard(target: str, name: str) -> Path:
    """The safetensors file holding ``name``: a local folder's, or one file from the Hub."""
    folder = Path(target)
    if folder.is_dir():
        index = folder / INDEX
        shard = json.loads(index.read_text())["weight_map"].get(name) if index.exists() else None
        return folder / (shard or "model.safetensors")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        shard = json.loads(Path(hf_hub_download(target, INDEX)).read_text())["weight_map"].get(name)
    except EntryNotFoundError:
        shard = None
    return Path(hf_hub_download(target, shard or "model.safetensors"))


def read_embedding(target: str, name: str) -> torch.Tensor:
    with safe_open(_shard(target, name), framework="pt") as weights:
        keys = set(weights.keys())
        # Some checkpoints name it without the base model's prefix ("embed_tokens.weight").
        found = name if name in keys else next((k for k in keys if name.endswith("." + k) or k.endswith("." + name)), None)
        if found is None:
            raise ValueError(f"{target}: no input embedding {name!r} in its checkpoint")
        return weights.get_tensor(found)


def load_eagle_away(eagle: str, target: str, device: str = "cpu", dtype: str = "default",
                    trust_remote_code: bool = False) -> Eagle3Drafter:
    """The EAGLE-3 drafter at ``eagle`` (folder or hub id) for ``target``, on ``device``."""
    config = load_config(target, trust_remote_code)
    torch_dtype = default_dtype(device) if dtype == "default" else DTYPES[dtype]
    weight = read_embedding(target, embedding_name(config, trust_remote_code))
    embedding = nn.Embedding.from_pretrained(weight.to(device=device, dtype=torch_dtype), freeze=True)
    return load_eagle(resolve(eagle), TargetInputs(config, embedding))

"""Load any Hugging Face causal LM (Llama, Qwen2, Mistral, GPT-2 families, ...) from a
local folder or a hub id, through the Auto classes. The bundled pair goes through
exactly this path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ..core.errors import InvalidRequest
from ..core.kv import check_rollback
from .attention import use_outrider_attention
from .lean import use_lean_decoding

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelPaths:
    target: str
    draft: str
    medusa: str | None = None  # Medusa heads for the target: folder or hub id
    # MTP modules: a heads folder or hub id; None = the target's own checkpoint, if it ships them
    mtp: str | None = None
    eagle: str | None = None  # an EAGLE-3 drafter for the target (published layout): folder or hub id


def bundled_paths() -> ModelPaths:
    return resolve_paths()


def resolve_paths(target: str | None = None, draft: str | None = None, medusa: str | None = None,
                  mtp: str | None = None, eagle: str | None = None) -> ModelPaths:
    """Unset models are the bundled ones; unset heads are those beside the target
    (``<target>-medusa``, ``<target>-mtp``, ``<target>-eagle``: where ``outrider build-heads`` saves them), if any."""
    target = target or str(BUNDLED_DIR / "target")

    def beside(kind: str) -> str | None:
        folder = Path(target).with_name(f"{Path(target).name}-{kind}")
        return str(folder) if folder.is_dir() else None

    return ModelPaths(target=target, draft=draft or str(BUNDLED_DIR / "draft"),
                      medusa=medusa or beside("medusa"), mtp=mtp or beside("mtp"),
                      eagle=eagle or beside("eagle"))


def default_dtype(device: str) -> torch.dtype:
    # bf16 weights are stored; CPUs without fast bf16 matmuls run fp32 faster.
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def configure_cuda() -> None:
    """Attention without per-shape plans. Speculative decoding runs attention at a new
    sequence length every step, and PyTorch's cuDNN SDPA backend (chosen for bf16 on
    Hopper) builds and caches an execution plan per shape. Measured on an H200 (torch
    2.11, cuDNN 9.19), bf16 at lengths not seen before: a draft step 68.3 ms with it,
    2.1 ms without; a 9-token target forward 56.6 ms against 7.7 ms. The flash and
    memory-efficient kernels that take over need no plan."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def load_model(name_or_path: str, device: str = "cpu", dtype: str = "default", trust_remote_code: bool = False,
               tensor_parallel: bool = False, lean: bool = False):
    """``tensor_parallel``: load this rank's shard with transformers' own TP plan
    (``tp_plan="auto"``) inside an initialised torch.distributed group. ``lean``: the
    model's passes through Outrider run the lean decoder where its family has one
    (models/lean.py; not on a TP shard, whose projections transformers' plan splits)."""
    hf_logging.disable_progress_bar()  # a bar per load clutters CLI output and logs
    if device.startswith("cuda"):
        configure_cuda()
    torch_dtype = default_dtype(device) if dtype == "default" else DTYPES[dtype]
    extra = {"tp_plan": "auto"} if tensor_parallel else {}
    check_rollback(load_config(name_or_path, trust_remote_code))
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra
    )
    if tensor_parallel:
        return use_outrider_attention(model).eval()
    model = use_outrider_attention(model.to(device)).eval()
    return use_lean_decoding(model) if lean else model


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


class VocabularyMismatch(InvalidRequest):
    """The draft cannot propose in the target's token space."""


def load_config(name_or_path: str, trust_remote_code: bool = False):
    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def check_pair(target_config, draft_config, target_tokenizer, draft_tokenizer) -> None:
    """Rejection sampling compares p and q token by token: the two models must share
    the token ids and the logits width."""
    if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise VocabularyMismatch("draft tokenizer vocabulary does not match the target's")
    if vocab_size(target_config) != vocab_size(draft_config):
        raise VocabularyMismatch(
            f"draft vocab_size {vocab_size(draft_config)} does not match the target's {vocab_size(target_config)}"
        )


def vocab_size(config) -> int:
    return int(config.get_text_config().vocab_size)


def max_context(model) -> int:
    return context_length(model.config)


def context_length(config) -> int:
    config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ValueError("cannot tell the model's context length from its config")

"""Training loops for the bundled pair: target LM pretraining and draft distillation.

Both loops are deterministic given the seed (batch k is drawn from a generator seeded
with (seed, k)) and resumable: they checkpoint model, optimizer and step atomically,
so an interrupted build continues where it stopped and produces the same weights.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    lr: float
    batch_size: int
    seq_len: int
    seed: int
    ckpt_every_s: float = 60.0
    warmup: int = 50


def llama_config(vocab_size: int, hidden: int, layers: int, intermediate: int, eos_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def sample_batch(tokens: np.ndarray, spec: TrainSpec, step: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - spec.seq_len - 1, (spec.batch_size,), generator=gen)
    rows = [torch.from_numpy(tokens[s : s + spec.seq_len + 1].astype(np.int64)) for s in starts.tolist()]
    return torch.stack(rows).to(device)  # [B, T+1]


def lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _autocast(device: str):
    # bf16 autocast on GPU; on CPU fp32 is faster than emulated bf16 matmuls.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()


def _save_ckpt(path: Path, model, opt, step: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
    tmp.replace(path)


def _load_ckpt(path: Path, model, opt) -> int:
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    return int(state["step"])


def run_training(name: str, model, loss_fn, tokens: np.ndarray, spec: TrainSpec, ckpt: Path, device: str) -> None:
    """Shared loop: AdamW, warmup + cosine, periodic atomic checkpoints, progress bar."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    start = _load_ckpt(ckpt, model, opt)
    model.train()
    last_save = time.monotonic()
    bar = tqdm(range(start, spec.steps), initial=start, total=spec.steps, desc=name, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec)
        batch = sample_batch(tokens, spec, step, device)
        with _autocast(device):
            loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if time.monotonic() - last_save > spec.ckpt_every_s or step + 1 == spec.steps:
            _save_ckpt(ckpt, model, opt, step + 1)
            last_save = time.monotonic()
    model.eval()


def lm_loss(model):
    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=batch[:, :-1]).logits  # [B, T, V]
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())

    return loss_fn


def distill_loss(draft, target):
    """Forward KL(p_target || q_draft) on every position: the draft learns the target's
    whole next-token distribution (not just the data's labels), which is what raises
    acceptance under both greedy and sampled verification (DistillSpec)."""

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        inputs = batch[:, :-1]
        with torch.no_grad():
            p_log = F.log_softmax(target(input_ids=inputs).logits.float(), dim=-1)
        q_log = F.log_softmax(draft(input_ids=inputs).logits.float(), dim=-1)
        return F.kl_div(q_log.flatten(0, 1), p_log.flatten(0, 1), log_target=True, reduction="batchmean")

    return loss_fn


def init_draft_from_target(draft: LlamaForCausalLM, target: LlamaForCausalLM) -> None:
    """Start the draft in the target's token space. Same width: copy the embeddings,
    final norm and first decoder layer. Narrower (the usual, cheaper case): use the
    target's embedding matrix projected onto its top principal directions (truncated
    SVD), so the tied LM head starts out ranking tokens the way the target does."""
    with torch.no_grad():
        t_emb = target.get_input_embeddings().weight.float()  # [V, D_target]
        d_emb = draft.get_input_embeddings().weight  # [V, D_draft]
        width = d_emb.shape[1]
        if width == t_emb.shape[1]:
            d_state = draft.state_dict()
            for key, value in target.state_dict().items():
                copyable = key.startswith("model.layers.0.") or not key.startswith("model.layers.")
                if copyable and key in d_state and d_state[key].shape == value.shape:
                    d_state[key] = value.clone()
            draft.load_state_dict(d_state)
            return
        u, s, _ = torch.linalg.svd(t_emb - t_emb.mean(0), full_matrices=False)
        k = min(width, s.shape[0])
        projected = u[:, :k] * s[:k]  # [V, k]
        d_emb.zero_()[:, :k] = projected * (t_emb.std() / projected.std())


@torch.no_grad()
def heldout_loss(model, tokens: np.ndarray, seq_len: int, windows: int, device: str) -> float:
    model.eval()
    stride = max(1, (len(tokens) - seq_len - 1) // windows)
    losses = []
    for i in range(windows):
        chunk = torch.from_numpy(tokens[i * stride : i * stride + seq_len + 1].astype(np.int64)).to(device)[None]
        with _autocast(device):
            logits = model(input_ids=chunk[:, :-1]).logits
        losses.append(F.cross_entropy(logits[0].float(), chunk[0, 1:]).item())
    return float(np.mean(losses))


def distill_heads(cfg, heads: torch.nn.Module, name: str, depths: int, kl_at) -> None:
    """The self-distillation loop drafting heads share (build/heads.py): ``kl_at(gen)``
    gives this step's KL per depth [depths] from a batch drawn with ``gen``; depths are
    weighted 0.8^k (Medusa's), gradients clipped at 1, AdamW with warmup and cosine
    decay; resumable from ``<name>.ckpt`` and done once ``<name>_trained.pt`` exists."""
    done = cfg.work_dir / f"{name}_trained.pt"
    if done.exists():
        heads.load_state_dict(torch.load(done))
        return
    params = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    spec = TrainSpec(cfg.steps, cfg.lr, 0, 0, cfg.seed, warmup=50)
    ckpt = cfg.work_dir / f"{name}.ckpt"
    start = _load_ckpt(ckpt, heads, opt)
    weights = torch.tensor([0.8**k for k in range(depths)], device=cfg.device)
    heads.train()
    last_save = time.monotonic()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"{cfg.kind} heads", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec)
        kl = kl_at(torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
        loss = (kl * weights).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(kl=" ".join(f"{x:.2f}" for x in kl.tolist()))
        if time.monotonic() - last_save > cfg.ckpt_every_s or step + 1 == cfg.steps:
            _save_ckpt(ckpt, heads, opt, step + 1)
            last_save = time.monotonic()
    torch.save(heads.state_dict(), done)

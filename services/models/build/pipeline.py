"""``outrider build-models``: tokenizer -> tokens -> target -> distilled draft -> export.

Each stage leaves its result in the work folder and is skipped when that result is
there, and training stages checkpoint, so re-running the command resumes a build.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaForCausalLM

from ..loading import ModelPaths
from .corpus import read_text, split_corpus
from .evaluate import greedy_acceptance, heldout_prompts, write_prompts
from .tokenizer import train_tokenizer
from .train import (
    TrainSpec,
    distill_loss,
    heldout_loss,
    init_draft_from_target,
    llama_config,
    lm_loss,
    run_training,
)


@dataclass(frozen=True)
class BuildConfig:
    out_dir: Path
    work_dir: Path
    seed: int = 0
    device: str = "cpu"
    vocab_size: int = 8192
    seq_len: int = 256
    batch_size: int = 8
    target_hidden: int = 512
    target_layers: int = 6
    target_intermediate: int = 1408
    target_steps: int = 1000
    target_lr: float = 1.5e-3
    # Wide enough to learn, small enough to stay in a CPU's L3 cache: on these machines
    # the draft's cost is its weights' bytes (a 512-wide draft cost 1/3 of the target).
    draft_hidden: int = 256
    draft_layers: int = 1
    draft_intermediate: int = 1024
    draft_steps: int = 800
    draft_lr: float = 2e-3
    ckpt_every_s: float = 60.0
    corpus_root: Path | None = None  # default: this Python's stdlib
    eval_prompts: int = 16
    eval_max_new_tokens: int = 128


def tokenize_files(tokenizer, files: list[Path], out: Path) -> np.ndarray:
    if out.exists():
        return np.load(out)
    ids: list[int] = []
    for path in tqdm(files, desc=f"tokenize {out.stem}", dynamic_ncols=True):
        ids.extend(tokenizer(read_text(path))["input_ids"])
        ids.append(tokenizer.eos_token_id)
    arr = np.asarray(ids, dtype=np.uint16)
    np.save(out, arr)
    return arr


def _train_model(name, cfg: BuildConfig, model, loss_fn, tokens, spec) -> LlamaForCausalLM:
    done = cfg.work_dir / name
    if (done / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(done, dtype=torch.float32).to(cfg.device)
    run_training(name, model, loss_fn, tokens, spec, cfg.work_dir / f"{name}.ckpt", cfg.device)
    model.save_pretrained(done)
    return model


def build_models(cfg: BuildConfig) -> dict:
    torch.manual_seed(cfg.seed)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    split = split_corpus(cfg.corpus_root)

    tok_dir = cfg.work_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(split.train, cfg.vocab_size).save_pretrained(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    train_ids = tokenize_files(tokenizer, split.train, cfg.work_dir / "train.npy")
    heldout_ids = tokenize_files(tokenizer, split.heldout, cfg.work_dir / "heldout.npy")

    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    target = LlamaForCausalLM(
        llama_config(vocab, cfg.target_hidden, cfg.target_layers, cfg.target_intermediate, eos)
    ).to(cfg.device)
    spec = TrainSpec(cfg.target_steps, cfg.target_lr, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.ckpt_every_s)
    target = _train_model("target", cfg, target, lm_loss(target), train_ids, spec)
    target.requires_grad_(False)

    draft = LlamaForCausalLM(
        llama_config(vocab, cfg.draft_hidden, cfg.draft_layers, cfg.draft_intermediate, eos)
    ).to(cfg.device)
    init_draft_from_target(draft, target)
    spec = TrainSpec(cfg.draft_steps, cfg.draft_lr, cfg.batch_size, cfg.seq_len, cfg.seed + 1, cfg.ckpt_every_s)
    draft = _train_model("draft", cfg, draft, distill_loss(draft, target), train_ids, spec)

    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "train_tokens": int(len(train_ids)),
        "heldout_tokens": int(len(heldout_ids)),
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "target_heldout_loss": heldout_loss(target, heldout_ids, cfg.seq_len, 64, cfg.device),
        "draft_heldout_loss": heldout_loss(draft, heldout_ids, cfg.seq_len, 64, cfg.device),
    }
    for name, model in (("target", target), ("draft", draft)):
        dest = cfg.out_dir / name
        model.to("cpu", dtype=torch.bfloat16).save_pretrained(dest)
        tokenizer.save_pretrained(dest)
    prompts = heldout_prompts(split.heldout, cfg.eval_prompts)
    write_prompts(prompts, cfg.out_dir / "heldout_prompts.jsonl")
    paths = ModelPaths(target=str(cfg.out_dir / "target"), draft=str(cfg.out_dir / "draft"))
    report["heldout_acceptance"] = [
        greedy_acceptance(paths, prompts, d, gamma=4, max_new=cfg.eval_max_new_tokens) for d in ("draft", "ngram")
    ]
    (cfg.out_dir / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report

"""``outrider build-heads``: Medusa heads or MTP modules (build/mtp.py) for any
causal-LM target, by self-distillation.

Stages, each leaving its result in the work folder (re-running resumes):
  1. prompts: windows of the stdlib corpus in the target's tokenizer (held-out modules
     kept apart for tuning);
  2. continuations: the target's own text from those prompts (half greedy, half
     sampled at T = 1), what the heads must predict at serving time;
  3. hidden states: the target's final hidden state at every position;
  4. training: head k at position t learns the target's distribution of the token
     k+2 ahead, KL(p_target || head_k) (the teacher is the target's LM head at t+k+1),
     the target frozen; resumable checkpoints;
  5. tuning: where the truth ranks among each head's candidates on held-out greedy
     continuations, the verify cost of an N-node tree measured on this device, and the
     tree that maximises expected tokens per unit of round cost (Medusa's greedy
     sparse-tree construction, with path acceptance counted rather than assumed
     independent across heads);
  6. export: config (with the tuned tree) + bf16 safetensors, in Hub format.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ...core.gamma import MAX_GAMMA
from ...core.target import Feed, TargetRunner
from ...core.tree import format_choices, tree_shape
from ..heads import HeadsConfig, MedusaHeads
from ...core.eagle_proposer import EagleTree
from ..eagle import init_from_target as init_eagle, new_drafter
from ..mtp import MtpHeads, init_from_target
from ..loading import load_model, load_tokenizer, resolve_paths
from .corpus import split_corpus
from .evaluate import greedy_acceptance, heldout_prompts
from .eagle import eagle_truth_ranks, layer_states, train_eagle, tune_tree
from .mtp import mtp_draft_s, mtp_truth_ranks, train_mtp
from .pipeline import tokenize_files
from .train import distill_heads


@dataclass(frozen=True)
class HeadsBuild:
    target: str  # folder or Hub id
    out_dir: Path
    work_dir: Path
    device: str = "cpu"
    kind: str = "medusa"  # or "mtp", "eagle"
    num_heads: int = 4  # Medusa heads, or MTP modules
    # MTP drafting depths trained and tuned (past num_heads they reuse the last module);
    # EAGLE's training-time-test steps.
    depths: int = 4
    window: int = 128  # MTP and EAGLE training window (tokens)
    # EAGLE's dynamic tree saved with it, "depth,top_k,nodes"; "" = the one measured
    # fastest on held-out prompts (build/eagle.py tune_tree).
    eagle_tree: str = ""
    tune_prompts: int = 8
    tune_max_new_tokens: int = 64
    draft_vocab: int = -1  # candidates from the K most frequent tokens; 0 = all; -1 = a quarter of a vocabulary >= 8k
    num_layers: int = 1
    share_lm_head: bool = True
    sequences: int = 1024  # self-distillation continuations
    heldout_sequences: int = 96
    prompt_len: int = 64
    gen_len: int = 192
    gen_batch: int = 64
    steps: int = 1500
    positions: int = 512  # training positions per step
    lr: float = 2e-3
    seed: int = 0
    max_tree_nodes: int = 64
    eval_prompts: int = 16
    eval_max_new_tokens: int = 128
    corpus_root: Path | None = None
    ckpt_every_s: float = 60.0


def default_out_dir(target: str, kind: str = "medusa") -> Path:
    """Beside a local target (``<target>-<kind>``); under the working folder for a Hub id."""
    path = Path(target)
    return path.with_name(f"{path.name}-{kind}") if path.is_dir() else Path(f"{target.replace('/', '--')}-{kind}")


def build_heads(cfg: HeadsBuild) -> dict:
    torch.manual_seed(cfg.seed)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    target = load_model(cfg.target, cfg.device, "float32" if cfg.device == "cpu" else "bfloat16")
    target.requires_grad_(False)
    tokenizer = load_tokenizer(cfg.target)
    split = split_corpus(cfg.corpus_root)
    train_seqs = _continuations(cfg, target, tokenizer, split.train, "train", cfg.sequences, cfg.seed)
    held_seqs = _continuations(cfg, target, tokenizer, split.heldout, "heldout", cfg.heldout_sequences, cfg.seed + 1)
    hidden = _hidden_states(cfg, target, train_seqs, "train")
    held_hidden = _hidden_states(cfg, target, held_seqs, "heldout")

    greedy = np.arange(len(held_seqs)) % 2 == 0  # tune for greedy text (sampled halves kept for the report)
    if cfg.kind == "eagle":
        return build_eagle(cfg, target, tokenizer, split, train_seqs, held_seqs[greedy], hidden)
    text = target.config.get_text_config(decoder=True)
    config = HeadsConfig(kind=cfg.kind, hidden_size=text.hidden_size,
                         vocab_size=target.get_output_embeddings().weight.shape[0], num_heads=cfg.num_heads,
                         num_layers=cfg.num_layers, share_lm_head=cfg.share_lm_head, target=str(cfg.target))
    if cfg.kind == "mtp":
        heads = MtpHeads(config, target).to(cfg.device)
        init_from_target(heads, target)
        train_mtp(cfg, heads, target, hidden, train_seqs)
        heads.eval()
        heads.set_draft_vocab(draft_vocab(cfg, train_seqs, config.vocab_size))
        ranks = mtp_truth_ranks(heads, cfg.depths, held_hidden[greedy], held_seqs[greedy], cfg.prompt_len, cfg.device)
    else:
        heads = MedusaHeads(config, target.get_output_embeddings()).to(cfg.device)
        _train(cfg, heads, target, hidden)
        heads.eval()
        if cfg.share_lm_head:
            heads.set_draft_vocab(draft_vocab(cfg, train_seqs, config.vocab_size))
        ranks = truth_ranks(heads, held_hidden[greedy], held_seqs[greedy], cfg.prompt_len, cfg.device)
    acceptance = rank_acceptance(ranks)
    coverage = float(np.isin(held_seqs[:, cfg.prompt_len:], heads.draft_vocab.cpu().numpy()).mean()) \
        if heads.draft_vocab is not None else 1.0
    # Timings, measured once (so a re-run picks the same tree): a verify pass with n nodes,
    # and drafting a tree of depth d (Medusa's heads cost the same at any depth; MTP runs
    # one module pass per depth), both relative to a one-token pass.
    times = _cached(cfg.work_dir / "verify_times.npy", lambda: verify_times(target, cfg.max_tree_nodes, cfg.device),
                    lambda t: len(t) > cfg.max_tree_nodes)
    depths = ranks.shape[1]
    draft = _cached(cfg.work_dir / f"draft_times.{cfg.kind}.npy",
                    lambda: np.array([0.0] + [mtp_draft_s(heads, d, 256, cfg.device) if cfg.kind == "mtp"
                                              else medusa_draft_s(heads, cfg.device) for d in range(1, depths + 1)]),
                    lambda t: len(t) == depths + 1)
    cost = times / times[0]
    choices, expected = choose_tree(ranks, cost, cfg.max_tree_nodes, draft / times[0])
    heads.config = heads.config.model_copy(update={"tree_choices": format_choices(choices)})
    heads.to("cpu").save(cfg.out_dir)
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "tree_choices": format_choices(choices),
        "tree_nodes": len(choices),
        "expected_accepted_per_round": expected,
        "heldout_top1_acceptance_per_head": [float(a[0]) for a in acceptance],
        "heldout_acceptance_per_head_rank": [[float(x) for x in a[:8]] for a in acceptance],
        "verify_cost_vs_one_token": {str(n): float(cost[n]) for n in (1, 4, 8, 16, 32, 64) if n < len(cost)},
        "draft_cost_vs_one_token_per_depth": [float(x) for x in draft[1:] / times[0]],
        "bytes": (cfg.out_dir / "model.safetensors").stat().st_size,
        "draft_vocab_size": heads.config.draft_vocab_size,
        "heldout_tokens_in_draft_vocab": coverage,
    }
    return finish_report(cfg, split, report)


def finish_report(cfg: HeadsBuild, split, report: dict) -> dict:
    """Adds what a user sees, in-process greedy drafting on held-out prompts (per depth,
    per rank), and writes the report beside the heads."""
    paths = resolve_paths(cfg.target, **{cfg.kind: str(cfg.out_dir)})
    report["heldout_acceptance"] = greedy_acceptance(paths, heldout_prompts(split.heldout, cfg.eval_prompts), cfg.kind,
                                                     MAX_GAMMA, cfg.eval_max_new_tokens)
    (cfg.out_dir / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_eagle(cfg: HeadsBuild, target, tokenizer, split, train_seqs: np.ndarray, held_greedy: np.ndarray,
                hidden: torch.Tensor) -> dict:
    """EAGLE-3: the draft vocabulary first (its LM head is sized by it), then
    training-time-test training, then the tree: the one asked for (``eagle_tree``), or
    the one measured fastest on held-out prompts."""
    vocab = target.get_output_embeddings().weight.shape[0]
    drafter = new_drafter(target, draft_vocab(cfg, train_seqs, vocab))
    drafter.to(cfg.device)
    init_eagle(drafter, target)
    features = layer_states(cfg, target, train_seqs, "train", drafter.layers)
    train_eagle(cfg, drafter, target, features, hidden, train_seqs)
    drafter.eval()
    held_features = layer_states(cfg, target, held_greedy, "heldout_greedy", drafter.layers)
    with torch.no_grad():
        ranks = eagle_truth_ranks(drafter, cfg.depths, held_features, held_greedy, cfg.prompt_len, cfg.device)
    acceptance = rank_acceptance(ranks)
    tuned = {}
    if cfg.eagle_tree:
        drafter.tree = EagleTree.parse(cfg.eagle_tree)
    else:
        prompts = [tokenizer(p)["input_ids"] for p in heldout_prompts(split.heldout, cfg.tune_prompts)]
        drafter.tree, tuned = tune_tree(drafter, target, prompts, cfg.tune_max_new_tokens)
    drafter.to("cpu").save(cfg.out_dir)
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "tree": drafter.tree.as_dict(),
        # Measured in one run: median speedup over target-only, mean accepted length.
        "tree_speedups": {label: {"speedup": v[0], "mean_accepted": v[1]} for label, v in tuned.items()},
        "feature_layers": list(drafter.layers),
        "heldout_top1_acceptance_per_step": [float(a[0]) for a in acceptance],
        "heldout_acceptance_per_step_rank": [[float(x) for x in a[:8]] for a in acceptance],
        "bytes": (cfg.out_dir / "model.safetensors").stat().st_size,
        "draft_vocab_size": len(drafter.draft_vocab) if drafter.draft_vocab is not None else vocab,
    }
    return finish_report(cfg, split, report)


def draft_vocab(cfg: HeadsBuild, seqs: np.ndarray, vocab: int) -> torch.Tensor | None:
    """The target's most frequent tokens in its own continuations, most frequent first."""
    size = (vocab // 4 if vocab >= 8192 else 0) if cfg.draft_vocab < 0 else min(cfg.draft_vocab, vocab)
    if size == 0 or size == vocab:
        return None
    counts = np.bincount(seqs[:, cfg.prompt_len:].ravel(), minlength=vocab)
    return torch.from_numpy(np.argsort(-counts, kind="stable")[:size].copy())


def _continuations(cfg, target, tokenizer, files, name, count, seed) -> np.ndarray:
    """[count, prompt_len + gen_len] int64: corpus prompts and the target's continuations;
    even rows greedy, odd rows sampled. Saved per batch, so an interrupted stage resumes."""
    out = cfg.work_dir / f"{name}_continuations.npy"
    if out.exists():
        return np.load(out)
    rng = np.random.default_rng(seed)
    picked = [files[i] for i in rng.permutation(len(files))[: max(8, count // 2)]]
    ids = tokenize_files(tokenizer, sorted(picked), cfg.work_dir / f"{name}_prompt_tokens.npy").astype(np.int64)
    starts = rng.integers(0, len(ids) - cfg.prompt_len, count)
    prompts = torch.from_numpy(np.stack([ids[s : s + cfg.prompt_len] for s in starts]))
    parts = []
    for b in tqdm(range(0, count, cfg.gen_batch), desc=f"continuations ({name})", dynamic_ncols=True):
        part = cfg.work_dir / f"{name}_continuations.{b}.npy"
        if not part.exists():
            batch = prompts[b : b + cfg.gen_batch].to(cfg.device)
            rows = []
            for sample in (False, True):  # greedy rows, then sampled rows
                sub = batch[int(sample) :: 2]
                torch.manual_seed(seed * 1_000_003 + b)
                with torch.no_grad():
                    gen = target.generate(sub, attention_mask=torch.ones_like(sub), max_new_tokens=cfg.gen_len,
                                          min_new_tokens=cfg.gen_len, do_sample=sample, temperature=1.0 if sample else None,
                                          top_k=0 if sample else None, top_p=1.0 if sample else None,
                                          pad_token_id=0)
                rows.append(gen.cpu())
            merged = torch.empty(len(batch), cfg.prompt_len + cfg.gen_len, dtype=torch.long)
            merged[0::2], merged[1::2] = rows
            np.save(part, merged.numpy())
        parts.append(np.load(part))
    seqs = np.concatenate(parts)
    np.save(out, seqs)
    return seqs


@torch.no_grad()
def _hidden_states(cfg, target, seqs: np.ndarray, name: str) -> torch.Tensor:
    """[n, T, H] float16: the final hidden state the LM head reads, at every position."""
    out = cfg.work_dir / f"{name}_hidden.pt"
    if out.exists():
        return torch.load(out)
    captured = []
    hook = target.get_output_embeddings().register_forward_hook(lambda m, a, o: captured.append(a[0].half().cpu()))
    try:
        for b in tqdm(range(0, len(seqs), 16), desc=f"hidden states ({name})", dynamic_ncols=True):
            target(input_ids=torch.from_numpy(seqs[b : b + 16]).to(cfg.device), logits_to_keep=0)
    finally:
        hook.remove()
    hidden = torch.cat(captured)
    torch.save(hidden, out)
    return hidden


def _train(cfg: HeadsBuild, heads: MedusaHeads, target, hidden: torch.Tensor) -> None:
    """KL(p_target(token t+k+2) || head_k(h_t)) for k < K, weighted 0.8^k as Medusa does."""
    lm_head = target.get_output_embeddings()
    K, (n, T, _) = cfg.num_heads, hidden.shape

    def kl_at(gen: torch.Generator) -> torch.Tensor:
        rows = torch.randint(0, n, (cfg.positions,), generator=gen)
        cols = torch.randint(cfg.prompt_len - 1, T - K - 1, (cfg.positions,), generator=gen)
        h = hidden[rows, cols].float().to(cfg.device)  # [P, H]
        ahead = hidden[rows[:, None], cols[:, None] + 1 + torch.arange(K)].float().to(cfg.device)  # [P, K, H]
        with torch.no_grad():
            teacher = F.log_softmax(lm_head(ahead).float(), -1)  # [P, K, V]: the target at t+k+1
        student = F.log_softmax(heads(h).float(), -1)  # [P, K, V]
        return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean(0)  # [K]

    distill_heads(cfg, heads, "heads", K, kl_at)


@torch.no_grad()
def truth_ranks(heads: MedusaHeads, hidden: torch.Tensor, seqs: np.ndarray, start: int, device: str,
                max_rank: int = 16) -> np.ndarray:
    """[positions, K] int: where the token k+2 ahead in the target's own text ranks
    among head k's candidates at each position (max_rank if not in the top max_rank).
    On greedy text that token is the target's argmax, so a tree path (r_1..r_d) is
    accepted at a position exactly when its first d ranks are r_1..r_d there."""
    K, T = heads.config.num_heads, hidden.shape[1]
    rows = []
    for b in range(len(seqs)):
        h = hidden[b, start - 1 : T - K - 1].float().to(device)  # [L, H]
        top = heads.candidates(heads(h), max_rank).cpu()  # [L, K, R] token ids
        cols = torch.arange(start - 1, T - K - 1)
        truth = torch.from_numpy(seqs[b])[cols[:, None] + 2 + torch.arange(K)]  # [L, K]
        hit = top == truth[..., None]
        rows.append(torch.where(hit.any(-1), hit.int().argmax(-1), max_rank).numpy())
    return np.concatenate(rows)


def rank_acceptance(ranks: np.ndarray, max_rank: int = 16) -> np.ndarray:
    """[K, max_rank]: how often head k's rank-r candidate is right (on its own)."""
    return np.stack([np.bincount(ranks[:, k], minlength=max_rank + 1)[:max_rank] for k in range(ranks.shape[1])]) / len(ranks)


def median_s(fn, device: str, repeats: int = 5) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


@torch.no_grad()
def medusa_draft_s(heads: MedusaHeads, device: str) -> float:
    """The heads' draft from one hidden state, which every round with a tree pays."""
    hidden = torch.zeros(heads.config.hidden_size, device=device, dtype=next(heads.parameters()).dtype)
    return median_s(lambda: heads(hidden), device)


def _cached(path: Path, measure, fits) -> np.ndarray:
    if path.exists() and fits(np.load(path)):
        return np.load(path)
    values = measure()
    np.save(path, values)
    return values


def verify_cost(target, max_nodes: int, device: str, repeats: int = 9) -> np.ndarray:
    """cost[n]: a verification pass with an n-node tree relative to one with one token."""
    times = verify_times(target, max_nodes, device, repeats)
    return times / times[0]


@torch.no_grad()
def verify_times(target, max_nodes: int, device: str, repeats: int = 9) -> np.ndarray:
    """times[n]: seconds for one verification pass with an n-node tree after a 256-token
    context (n = 0: the one-token step), measured on this device."""
    runner = TargetRunner(target, kv_cache_bytes=64 * 2**20)
    runner.prefill("ctx", list(range(3, 259)), [])

    feeds = [Feed("ctx", 256, [5] + [7] * n, n + 1, tree_shape(tuple([-1] * n)).parents if n else None)
             for n in range(max_nodes + 1)]
    times = np.array([median_s(lambda feed=feed: runner.forward([feed]), device, repeats) for feed in feeds])
    return np.maximum.accumulate(times)  # noise aside, more nodes never cost less


def choose_tree(ranks: np.ndarray, cost: np.ndarray, max_nodes: int, draft_cost: np.ndarray | None = None,
                max_rank: int = 16) -> tuple[tuple[tuple[int, ...], ...], float]:
    """Grow the tree one node at a time, always adding the path accepted at the most
    held-out positions (counted, not multiplied out: heads' errors are correlated),
    and keep the size that maximises (1 + expected accepted) / round cost, the round
    being a verify pass of that size (``cost[n]``) plus drafting a tree that deep
    (``draft_cost[depth]``; when given, every depth limit is grown and the best kept,
    since a deeper node then also prices every depth above it). ``ranks``:
    truth_ranks. Returns (choices, expected accepted per round)."""
    K = ranks.shape[1]
    matches = {(): np.ones(len(ranks), dtype=bool)}  # positions where each path is accepted

    def children(path):
        at = matches[path]
        for r in range(max_rank):
            if path + (r,) not in matches:
                matches[path + (r,)] = at & (ranks[:, len(path)] == r)
            yield path + (r,), float(matches[path + (r,)].mean())

    def grow(limit: int) -> tuple[float, tuple, float]:
        frontier = dict(children(()))
        chosen: list[tuple[int, ...]] = []
        expected, best = 0.0, (0.0, (), 0.0)
        while frontier and len(chosen) < max_nodes:
            path = max(frontier, key=lambda p: (frontier[p], -len(p)))
            prob = frontier.pop(path)
            if prob <= 0:
                break
            chosen.append(path)
            expected += prob
            if len(path) < limit:
                frontier.update(children(path))
            depth = max(len(p) for p in chosen)
            score = (1 + expected) / (cost[len(chosen)] + (0.0 if draft_cost is None else draft_cost[depth]))
            if score > best[0]:
                best = (score, tuple(chosen), expected)
        return best

    best = max((grow(limit) for limit in (range(1, K + 1) if draft_cost is not None else [K])), key=lambda b: b[0])
    return best[1], best[2]

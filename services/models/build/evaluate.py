"""Held-out prompts and the acceptance figure reported for the bundled pair."""

from __future__ import annotations

import json
from pathlib import Path

from ...core.gamma import GammaSchedule
from ...core.sampling import SamplingParams
from ...core.stats import GenerationStats
from ..loading import ModelPaths
from ..pair import HEAD_KINDS, load_pair, make_engine
from .corpus import read_text

PROMPT_CHARS = 320


def heldout_prompts(files: list[Path], count: int) -> list[str]:
    """``count`` prompts spread evenly over the held-out files, each starting and
    ending at a line boundary."""
    texts = [read_text(f) for f in files]
    per_file = max(1, -(-count // len(texts)))
    prompts = []
    for text in texts:
        for k in range(per_file):
            start = text.find("\n", len(text) * (k + 1) // (per_file + 1)) + 1
            end = text.rfind("\n", start, start + PROMPT_CHARS) + 1
            chunk = text[start:end]
            if chunk.strip():
                prompts.append(chunk)
    step = len(prompts) / count
    return [prompts[int(i * step)] for i in range(min(count, len(prompts)))]


def write_prompts(prompts: list[str], path: Path) -> None:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


def greedy_acceptance(paths: ModelPaths, prompts: list[str], drafter: str, gamma: int, max_new: int) -> dict:
    pair = load_pair(paths, with_draft=drafter == "draft", heads=(drafter,) if drafter in HEAD_KINDS else ())
    engine = make_engine(pair, drafter, GammaSchedule(initial=gamma))
    total = GenerationStats()
    for text in prompts:
        total += engine.generate(pair.tokenizer(text)["input_ids"], max_new, SamplingParams()).stats
    return {"drafter": drafter, "gamma": gamma, "max_new_tokens": max_new, "prompts": len(prompts),
            "acceptance_rate": total.acceptance_rate, "mean_acceptance_length": total.mean_acceptance_length,
            "acceptance_per_position": total.acceptance_per_position, "accepted_per_rank": total.accepted_per_rank,
            "draft_shape": total.draft_shape}

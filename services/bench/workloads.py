"""Benchmark workloads beyond the held-out prompts.

``repetitive``: an editor's. One code file is submitted again and again, each time a
little changed (an identifier renamed, a number edited), and completed each time, as an
editor's completion or an agent's edit-and-rerun loop does. Most of every completion
repeats text the server has seen: in the prompt, and in the completions of the requests
before it. That is the workload suffix decoding is built for (SuffixDecoding reports up
to 5.3x on agentic ones), and the held-out prompts do not have it.
"""

from __future__ import annotations

import random
import re

IDENTIFIER = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{2,}\b")
NUMBER = re.compile(r"\b\d+\b")


def editor_session(base: str, requests: int, seed: int) -> list[str]:
    """``requests`` prompts: ``base``, then each one the one before with one more edit."""
    rng = random.Random(seed)
    prompts, text = [base], base
    for _ in range(requests - 1):
        text = _edit(text, rng)
        prompts.append(text)
    return prompts


def _edit(text: str, rng: random.Random) -> str:
    numbers = NUMBER.findall(text)
    if numbers and rng.random() < 0.3:
        old = rng.choice(numbers)
        return re.sub(rf"\b{old}\b", str(int(old) + rng.randint(1, 9)), text, count=1)
    names = sorted(set(IDENTIFIER.findall(text)))
    if not names:
        return text + "\n"
    old = rng.choice(names)
    return re.sub(rf"\b{re.escape(old)}\b", old + rng.choice(("_new", "2", "_x", "_tmp")), text)


def repetitive_prompts(texts: list[str], requests: int, round: int) -> list[str]:
    """Pass ``round``'s workload: an editor session over one of ``texts`` (a different
    one each pass, so a pass never finds its own completions from an earlier pass in
    the server's suffix index)."""
    return editor_session(texts[round % len(texts)], requests, seed=round)

"""Standardized sampling: temperature, top-k and top-p all map logits to one adjusted
distribution. The verifier applies the *same* map to the target's and the draft's
logits before the acceptance test; testing against unadjusted distributions samples
from the wrong distribution (vLLM PR #10198)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

from .errors import InvalidRequest


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0  # 1 disables top-p
    seed: int | None = None  # None draws a fresh seed per request

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generators(self, device: torch.device | str = "cpu") -> tuple[torch.Generator, torch.Generator]:
        """Independent (draft, verify) random streams derived from the seed. Separate
        streams let drafting and verification run in different processes and still
        reproduce a seeded request exactly."""
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**63)
        return tuple(
            torch.Generator(device=device).manual_seed(derive_seed(seed, role)) for role in ("draft", "verify")
        )


def derive_seed(seed: int, role: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{role}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def adjusted_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> adjusted probabilities [..., V] (float32)."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
        # *before* it already reaches top_p. The top-1 token is always kept.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """probs [N, V] -> token ids [N]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

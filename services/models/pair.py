"""A target/draft pair loaded and checked, and the engine built on it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.engine import SpeculativeEngine
from ..core.errors import InvalidRequest
from ..core.gamma import GammaSchedule
from ..core.proposers import DraftModelProposer, NgramProposer, Proposer
from ..core.verifier import TargetVerifier
from ..core.target import TargetRunner
from .loading import ModelPaths, check_pair, load_model, load_tokenizer, max_context

DRAFTERS = ("draft", "ngram", "none")


@dataclass
class ModelPair:
    target: torch.nn.Module
    draft: torch.nn.Module | None
    tokenizer: object
    paths: ModelPaths

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def max_context(self) -> int:
        return max_context(self.target)


def load_pair(
    paths: ModelPaths,
    device: str = "cpu",
    dtype: str = "default",
    with_draft: bool = True,
    trust_remote_code: bool = False,
) -> ModelPair:
    tokenizer = load_tokenizer(paths.target, trust_remote_code)
    target = load_model(paths.target, device, dtype, trust_remote_code)
    draft = None
    if with_draft:
        draft = load_model(paths.draft, device, dtype, trust_remote_code)
        check_pair(target.config, draft.config, tokenizer, load_tokenizer(paths.draft, trust_remote_code))
    return ModelPair(target=target, draft=draft, tokenizer=tokenizer, paths=paths)


def make_proposer(pair: ModelPair, drafter: str, confidence_stop: float = 0.0) -> Proposer | None:
    if drafter == "draft":
        if pair.draft is None:
            raise InvalidRequest("the draft drafter needs a draft model")
        return DraftModelProposer(pair.draft, confidence_stop=confidence_stop)
    if drafter == "ngram":
        return NgramProposer(device=pair.target.device)
    if drafter == "none":
        return None
    raise InvalidRequest(f"unknown drafter {drafter!r}; choose one of {', '.join(DRAFTERS)}")


def make_engine(
    pair: ModelPair, drafter: str, schedule: GammaSchedule, confidence_stop: float = 0.0
) -> SpeculativeEngine:
    return SpeculativeEngine(
        verifier=TargetVerifier(TargetRunner(pair.target)),
        proposer=make_proposer(pair, drafter, confidence_stop),
        eos_token_id=pair.eos_token_id,
        max_context=pair.max_context,
        schedule=schedule,
    )

"""A target/draft pair loaded and checked, and the engine built on it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.engine import SpeculativeEngine
from ..core.errors import InvalidRequest
from ..core.gamma import GammaSchedule
from ..core.head_proposers import MedusaProposer
from ..core.proposers import DraftModelProposer, NgramProposer, Proposer
from ..core.tree import choice_tree, parse_choices
from ..core.verifier import TargetVerifier
from ..core.target import TargetRunner
from .heads import load_heads
from .loading import ModelPaths, check_pair, load_model, load_tokenizer, max_context

DRAFTERS = ("draft", "ngram", "medusa", "none")


@dataclass
class ModelPair:
    target: torch.nn.Module
    draft: torch.nn.Module | None
    tokenizer: object
    paths: ModelPaths
    heads: torch.nn.Module | None = None  # Medusa heads on the target

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
    with_heads: bool = False,
) -> ModelPair:
    tokenizer = load_tokenizer(paths.target, trust_remote_code)
    target = load_model(paths.target, device, dtype, trust_remote_code)
    draft = None
    if with_draft:
        draft = load_model(paths.draft, device, dtype, trust_remote_code)
        check_pair(target.config, draft.config, tokenizer, load_tokenizer(paths.draft, trust_remote_code))
    heads = None
    if with_heads:
        if paths.medusa is None:
            raise InvalidRequest(f"no Medusa heads for {paths.target}: build them with `outrider build-heads "
                                 f"--target {paths.target}` or pass --medusa")
        heads = load_heads(paths.medusa, target)
    return ModelPair(target=target, draft=draft, tokenizer=tokenizer, paths=paths, heads=heads)


def make_proposer(pair: ModelPair, drafter: str, confidence_stop: float = 0.0, tree: str | None = None) -> Proposer | None:
    """``tree``: the Medusa tree as paths of candidate ranks (default: the heads' tuned one)."""
    if drafter == "draft":
        if pair.draft is None:
            raise InvalidRequest("the draft drafter needs a draft model")
        return DraftModelProposer(pair.draft, confidence_stop=confidence_stop)
    if drafter == "ngram":
        return NgramProposer(device=pair.target.device)
    if drafter == "medusa":
        if pair.heads is None:
            raise InvalidRequest("the medusa drafter needs Medusa heads (load_pair(..., with_heads=True))")
        return medusa_proposer(pair.heads, tree)
    if drafter == "none":
        return None
    raise InvalidRequest(f"unknown drafter {drafter!r}; choose one of {', '.join(DRAFTERS)}")


def medusa_proposer(heads, tree: str | None = None) -> MedusaProposer:
    """Drafts ``tree`` (paths of candidate ranks; None or "" = the heads' tuned tree)."""
    try:
        shape = choice_tree(parse_choices(tree)) if tree else heads.config.tree()
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
    if shape.shape.max_depth > heads.config.num_heads:
        raise InvalidRequest(f"tree depth {shape.shape.max_depth} exceeds the {heads.config.num_heads} Medusa heads")
    return MedusaProposer(heads, shape, next(heads.parameters()).device)


def make_engine(
    pair: ModelPair, drafter: str, schedule: GammaSchedule, confidence_stop: float = 0.0, tree: str | None = None
) -> SpeculativeEngine:
    return SpeculativeEngine(
        verifier=TargetVerifier(TargetRunner(pair.target)),
        proposer=make_proposer(pair, drafter, confidence_stop, tree),
        eos_token_id=pair.eos_token_id,
        max_context=pair.max_context,
        schedule=schedule,
    )

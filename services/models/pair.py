"""A target/draft pair loaded and checked, and the engine built on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch

from ..core.engine import SpeculativeEngine
from ..core.errors import InvalidRequest
from ..core.gamma import GammaSchedule
from ..core.head_proposers import MedusaProposer
from ..core.eagle_proposer import EagleProposer, EagleTree
from ..core.eagle_relay import DEFAULT_WINDOW, EagleFeatureRelay
from ..core.mtp_proposer import MtpProposer
from ..core.multi_draft import TreeProposer, tree_members
from ..core.proposers import DraftModelProposer, NgramProposer, Proposer
from ..core.suffix import SuffixProposer
from ..core.tree import choice_tree, parse_choices
from ..core.tree_planner import AUTO_TREE, TreePlanner
from ..core.verifier import TargetVerifier
from ..core.target import TargetRunner
from .eagle import fused
from .heads import load_heads
from .loading import ModelPaths, check_pair, load_model, load_tokenizer, max_context

HEAD_KINDS = ("medusa", "mtp", "eagle")  # drafters that run on the verifier, from the target's hidden states
DRAFTERS = ("draft", "ngram", "suffix", *HEAD_KINDS, "tree", "none")
MAX_HEAD_DEPTH = 8
PLANNED_NODES = 32  # the largest tree a planner may plan


@dataclass
class ModelPair:
    target: torch.nn.Module
    draft: torch.nn.Module | None
    tokenizer: object
    paths: ModelPaths
    heads: dict[str, torch.nn.Module] = field(default_factory=dict)  # kind -> heads on the target

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
    heads: tuple[str, ...] = (),
) -> ModelPair:
    """``heads``: the kinds of drafting heads to load (of HEAD_KINDS)."""
    tokenizer = load_tokenizer(paths.target, trust_remote_code)
    target = load_model(paths.target, device, dtype, trust_remote_code, lean=True)
    draft = None
    if with_draft:
        draft = load_model(paths.draft, device, dtype, trust_remote_code, lean=True)
        check_pair(target.config, draft.config, tokenizer, load_tokenizer(paths.draft, trust_remote_code))
    loaded = {kind: load_pair_heads(paths, kind, target) for kind in heads}
    return ModelPair(target=target, draft=draft, tokenizer=tokenizer, paths=paths, heads=loaded)


def load_pair_heads(paths: ModelPaths, kind: str, target) -> torch.nn.Module:
    """Heads of ``kind`` for the loaded ``target``: from their folder (or hub id) in
    ``paths``; MTP modules otherwise from the target's own checkpoint if it ships them."""
    if kind not in HEAD_KINDS:
        raise InvalidRequest(f"unknown heads {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
    where = getattr(paths, kind)
    if where is None and kind in ("medusa", "eagle"):
        name = "Medusa heads" if kind == "medusa" else "EAGLE-3 drafter"
        raise InvalidRequest(f"no {name} for {paths.target}: build one with `outrider build-heads "
                             f"--kind {kind} --target {paths.target}` or pass --{kind}")
    try:
        return load_heads(where or paths.target, target, kind)
    except ValueError as err:
        if where is None:
            raise InvalidRequest(f"no MTP modules for {paths.target}: it ships none in a known layout ({err}); build "
                                 f"them with `outrider build-heads --kind mtp --target {paths.target}` or pass --mtp") from None
        raise InvalidRequest(str(err)) from None


def make_proposer(pair: ModelPair, drafter: str, confidence_stop: float = 0.0, tree: str | None = None) -> Proposer | None:
    """``tree``: the Medusa tree as paths of candidate ranks (default: the heads' tuned
    one); for ``tree``, the drafters it merges (tree_members)."""
    if drafter == "draft":
        if pair.draft is None:
            raise InvalidRequest("the draft drafter needs a draft model")
        return DraftModelProposer(pair.draft, confidence_stop=confidence_stop)
    if drafter == "ngram":
        return NgramProposer(device=pair.target.device)
    if drafter == "suffix":
        return SuffixProposer(device=pair.target.device)
    if drafter == "tree":
        return TreeProposer([make_proposer(pair, m, confidence_stop) for m in tree_members(tree)], device=pair.target.device)
    if drafter in HEAD_KINDS:
        if drafter not in pair.heads:
            raise InvalidRequest(f"the {drafter} drafter needs its heads (load_pair(..., heads=({drafter!r},)))")
        return head_proposer(pair.heads[drafter], tree, Planners(pair.target)(pair.heads[drafter]))
    if drafter == "none":
        return None
    raise InvalidRequest(f"unknown drafter {drafter!r}; choose one of {', '.join(DRAFTERS)}")


def drafter_heads(drafter: str, tree: str | None = None) -> tuple[str, ...]:
    """The heads ``drafter`` needs loaded: its own, or a tree's members' (``tree``)."""
    if drafter == "tree":
        return tuple(m for m in tree_members(tree) if m in HEAD_KINDS)
    return (drafter,) if drafter in HEAD_KINDS else ()


def head_proposer(heads, tree: str | None = None, planner: Callable[[], TreePlanner] | None = None
                  ) -> MedusaProposer | MtpProposer | EagleProposer:
    """Drafts ``tree`` (paths of candidate ranks, or EAGLE's "depth,top_k,nodes"; None or
    "" = the heads' tuned tree; "auto" = planned from measurement by ``planner()``, the
    replica's planner for these heads) with Medusa heads, MTP modules or an EAGLE-3 drafter."""
    if getattr(heads, "kind", "") == "eagle":
        try:
            shape = EagleTree.parse(tree) if tree else heads.tree
        except ValueError as err:
            raise InvalidRequest(str(err)) from None
        return EagleProposer(heads, shape, heads.fc.weight.device)
    planned = None
    if tree == AUTO_TREE:
        if planner is None:
            raise InvalidRequest("this verifier cannot plan trees (tensor parallel); name a tree or leave it empty")
        planned, tree = planner(), ""
    try:
        shape = choice_tree(parse_choices(tree)) if tree else heads.config.tree()
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
    device = next(heads.parameters()).device
    if heads.config.kind == "mtp":
        if shape.shape.max_depth > MAX_HEAD_DEPTH:
            raise InvalidRequest(f"tree depth {shape.shape.max_depth} exceeds {MAX_HEAD_DEPTH} MTP depths")
        return MtpProposer(heads, shape, device, planned)
    if shape.shape.max_depth > heads.config.num_heads:
        raise InvalidRequest(f"tree depth {shape.shape.max_depth} exceeds the {heads.config.num_heads} Medusa heads")
    return MedusaProposer(heads, shape, device, planned)


def tree_planner(target, heads) -> TreePlanner:
    """A planner for Medusa heads' or MTP modules' trees, starting from their tuned tree,
    with T(n) measured on ``target``'s device (a few seconds on a CPU)."""
    from .build.heads import verify_cost  # (build imports this module)

    if getattr(heads, "kind", "") == "eagle":
        raise InvalidRequest("EAGLE grows its own tree each round: 'auto' plans Medusa and MTP trees")
    initial = heads.config.tree()
    depth = initial.shape.max_depth if heads.config.kind == "mtp" else heads.config.num_heads
    cost = verify_cost(target, PLANNED_NODES, str(next(target.parameters()).device), repeats=5)
    return TreePlanner(initial, cost, depth)


class Planners:
    """A replica's tree planners, one per head kind, made on first use."""

    def __init__(self, target):
        self.target, self.made = target, {}

    def __call__(self, heads) -> Callable[[], TreePlanner]:
        def get() -> TreePlanner:
            kind = heads.config.kind
            if kind not in self.made:
                self.made[kind] = tree_planner(self.target, heads)
            return self.made[kind]
        return get


def eagle_relay(eagle, window: int = DEFAULT_WINDOW) -> Callable[[str], EagleFeatureRelay]:
    """For a verifier whose EAGLE drafts on the draft workers: a relay per request, for
    the tree it asks for ("" = the drafter's saved one). It keeps only ``eagle``'s fc."""
    fuse, hidden, saved, device = partial(fused, eagle.fc), eagle.target_hidden, eagle.tree, eagle.fc.weight.device

    def relay(tree: str) -> EagleFeatureRelay:
        try:
            shape = EagleTree.parse(tree) if tree else saved
        except ValueError as err:
            raise InvalidRequest(str(err)) from None
        return EagleFeatureRelay(fuse, hidden, shape, window, device)

    return relay


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

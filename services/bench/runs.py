"""One timed pass of one decoding method over a prompt set (greedy, batch 1)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..core.gamma import GammaSchedule
from ..core.sampling import SamplingParams
from ..core.stats import GenerationStats
from ..core.tree import format_choices
from ..models.pair import ModelPair, make_engine


@dataclass
class Run:
    method: str  # target-only | outrider-draft | outrider-ngram | hf-assisted | hf-target-only
    gamma: int | None  # None for target-only; 0 marks the adaptive schedule
    tree: str = ""  # a tree drafter's shape (ChoiceTree.label), instead of gamma
    fanout: int | None = None  # served, pipelined: the speculation cache's branches a round (None: the server's)
    tokens: int = 0
    seconds: float = 0.0
    stats: GenerationStats = field(default_factory=GenerationStats)
    outputs: list[list[int]] = field(default_factory=list)
    concurrency: int | None = None  # streams at once (concurrency scenarios)
    ttfts: list[float] = field(default_factory=list)  # per stream: seconds to its first tokens (concurrency scenarios)
    # A planned head tree (core/tree_planner.py): its last plan and its prediction against what its rounds did.
    plan: dict | None = None

    @property
    def label(self) -> str:
        if self.gamma is None:
            return self.method
        if self.tree:
            return f"{self.method} {self.tree}"
        fanout = "" if self.fanout is None else f" fanout={self.fanout}"
        return f"{self.method} gamma={'adaptive' if self.gamma == 0 else self.gamma}{fanout}"

    @property
    def drafter(self) -> str:
        """draft, ngram, medusa...: the method without its mode."""
        return self.method.removeprefix("outrider-").removesuffix("-serial")

    @property
    def gamma_or_tree(self) -> str:
        return self.tree or ("adaptive" if self.gamma == 0 else str(self.gamma))

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def run_outrider(pair: ModelPair, drafter: str, gamma: int | None, prompts: list[list[int]], max_new: int,
                 tree: str | None = None) -> Run:
    """``gamma`` for a tree drafter (medusa) caps the tree's depth; ``tree`` is its
    shape as paths of candidate ranks (None: the heads' tuned tree)."""
    if drafter == "none":
        schedule, method = GammaSchedule(initial=0), "target-only"
    else:
        adaptive = gamma == 0
        schedule, method = GammaSchedule(initial=4 if adaptive else gamma, adaptive=adaptive), f"outrider-{drafter}"
    engine = make_engine(pair, drafter, schedule, tree=tree)
    run = Run(method=method, gamma=None if drafter == "none" else gamma)
    for ids in prompts:
        result = engine.generate(ids, max_new, SamplingParams())
        run.stats += result.stats
        run.tree = result.stats.draft_shape
        run.outputs.append(result.token_ids)
        run.tokens += len(result.token_ids)
        run.seconds += result.stats.total_time_s
    planner = getattr(engine.proposer, "planner", None)
    if planner is not None:
        run.tree = f"planned {planner.tree.label if planner.tree else 'nothing'}"
        run.plan = {"choices": format_choices(planner.tree.choices) if planner.tree else "",
                    "predicted_tokens_per_round": planner.predicted,
                    "measured_over_predicted": planner.measured_over_predicted, "rounds": planner.rounds}
    return run


@torch.inference_mode()
def run_hf(pair: ModelPair, gamma: int | None, prompts: list[list[int]], max_new: int) -> Run:
    """transformers' own ``generate``: target-only, or assisted by the same draft with a
    constant ``num_assistant_tokens`` = gamma and no confidence stop (like for like)."""
    extra = {}
    if gamma is not None:
        extra = dict(assistant_model=pair.draft, num_assistant_tokens=gamma,
                     num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)
    run = Run(method="hf-target-only" if gamma is None else "hf-assisted", gamma=gamma)
    eos = pair.eos_token_id
    for ids in prompts:
        input_ids = torch.tensor([ids], device=pair.target.device)
        start = time.perf_counter()
        out = pair.target.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new, do_sample=False,
            eos_token_id=eos, pad_token_id=eos, **extra,
        )
        run.seconds += time.perf_counter() - start
        new = out[0, len(ids):].tolist()
        run.outputs.append(new)
        run.tokens += len(new)
    return run


def leviathan_speedup(run: Run, ar_seconds_per_token: float) -> float:
    """Leviathan et al.'s expected speedup E / (g*c + v), with the run's measured
    per-token acceptance a (their alpha), mean drafted length g, draft cost per token c
    and verify cost per round v (both in units of one target-only token), where
    E = (1 - a^(g+1)) / (1 - a). The formula assumes independent acceptances; real
    acceptance comes in runs, so measured speedups can exceed it."""
    s = run.stats
    if not s.rounds or not s.drafted:
        return 1.0
    a, g = s.per_token_acceptance, s.drafted / s.rounds
    expected = g + 1 if a >= 1 else (1 - a ** (g + 1)) / (1 - a)
    draft_cost = (s.draft_time_s / s.drafted) / ar_seconds_per_token
    verify_cost = (s.verify_time_s / s.rounds) / ar_seconds_per_token
    return expected / (g * draft_cost + verify_cost)


def run_server(client, method: str, gamma: int | None, pipeline: bool, prompts: list[str], max_new: int,
               tree: str = "", fanout: int | None = None) -> Run:
    """The same pass through a running server's public gRPC API (greedy). Seconds are
    the client's wall time per request, so every hop and queue is included. ``tree``:
    a tree method's shape (paths of candidate ranks; "" = the server's). ``fanout``:
    the speculation cache's (None: the server's default)."""
    from ..gateway.client import make_request
    from ..rpc.convert import stats_from_proto

    label = "target-only" if method == "none" else f"outrider-{method}" + ("" if pipeline else "-serial")
    run = Run(method=label, gamma=None if method == "none" else gamma, fanout=fanout)
    for prompt in prompts:
        request = make_request(prompt, max_new, method=method, gamma=gamma or 0, adaptive=gamma == 0, pipeline=pipeline,
                               tree=tree, fanout=fanout)
        start = time.perf_counter()
        ids, stats = [], None
        for chunk in client.generate(request):
            ids.extend(chunk.token_ids)
            if chunk.HasField("stats"):
                stats = chunk.stats
        run.seconds += time.perf_counter() - start
        run.stats += stats_from_proto(stats)
        run.tree = stats.draft_shape
        run.outputs.append(ids)
        run.tokens += len(ids)
    return run

"""``build_app(args)``: the Serve application graph gateway -> verifier -> drafter."""

from __future__ import annotations

from ray.serve import Application

from ..drafter.deployment import DraftWorker
from ..gateway.deployment import Gateway
from ..verifier.deployment import Verifier
from .args import AppArgs


def build_app(args: dict | None = None) -> Application:
    cfg = AppArgs.model_validate(args or {})
    plain = cfg.model_dump()  # replicas re-validate; a dict pickles without pydantic state
    drafter = DraftWorker.options(**cfg.serve_options("drafter")).bind(plain)
    placement = {}
    if cfg.tensor_parallel_size > 1:
        # The replica and its ranks in one placement group on one node (one GPU per
        # rank there); the ranks are scheduled into it by verifier/tensor_parallel.py.
        placement = dict(placement_group_bundles=cfg.verifier_bundles(), placement_group_strategy="STRICT_PACK")
    verifier = Verifier.options(**cfg.serve_options("verifier"), **placement).bind(drafter, plain)
    return Gateway.options(**cfg.serve_options("gateway")).bind(verifier, plain)

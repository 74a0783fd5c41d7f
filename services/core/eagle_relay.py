"""EAGLE drafted on a draft worker (``eagle.placement: drafter``): the verifier's part.

An EAGLE drafter needs the target's features every round, which is why serving systems
run it beside the target. Here the verifier only fuses them: EAGLE-3's ``fc`` turns
the low, middle and high layer states [n, 3H] of the positions a round committed into
[n, H], a third of the bytes, and the draft stream carries them to the worker with the
round's outcome (H x 2 bytes a token in bf16: 8 KB at H = 4,096). The worker holds
the rest of the drafter (its layer, KV, LM head) and drafts there, the next round's
early block included, so the draft hides behind the next verify as the draft model's
does (core/pipeline.py).

A session keeps its last ``window`` positions' features, so that a stream reopened on
another worker (its worker died, or was full) starts from them; the worker's drafter
attends over what it was given (a longer text than the window loses only draft
quality: the target verifies every token either way).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from .eagle_proposer import EagleTree
from .kv_chunks import KVChunk
from .proposals import Proposal
from .sampling import SamplingParams

DEFAULT_WINDOW = 2048  # positions of features a session keeps for a reopened stream


class FeatureLog:
    """One session's fused features on the verifier: the rows not yet sent, and the
    last ``window`` positions' for a reopened stream."""

    def __init__(self, window: int = DEFAULT_WINDOW):
        self.window = window
        self.pieces: deque[tuple[int, torch.Tensor]] = deque()  # (start, rows [n, H]), contiguous
        self.kept = 0  # rows in pieces
        self.unsent: list[tuple[int, torch.Tensor]] = []

    @property
    def end(self) -> int:
        """The position after the last row (0: none yet)."""
        return self.pieces[-1][0] + len(self.pieces[-1][1]) if self.pieces else 0

    def add(self, start: int, rows: torch.Tensor) -> None:
        if self.pieces and start != self.end:  # a gap (a prefix served from cache): start afresh
            self.pieces.clear()
            self.kept, self.unsent = 0, []
        rows = rows.detach()
        self.pieces.append((start, rows))
        self.unsent.append((start, rows))
        self.kept += len(rows)
        while len(self.pieces) > 1 and self.kept - len(self.pieces[0][1]) >= self.window:
            self.kept -= len(self.pieces.popleft()[1])

    def take_unsent(self) -> tuple[int, torch.Tensor] | None:
        """The rows added since the last take or snapshot, as (start, rows [n, H])."""
        unsent, self.unsent = self.unsent, []
        return _joined(unsent)

    def snapshot(self) -> tuple[int, torch.Tensor] | None:
        """The last ``window`` positions' rows (a newly opened stream's); nothing stays unsent."""
        self.unsent = []
        joined = _joined(list(self.pieces))
        if joined is None:
            return None
        start, rows = joined
        cut = max(0, len(rows) - self.window)
        return start + cut, rows[cut:]


class EagleFeatureRelay:
    """Stands in for the EAGLE proposer on the verifier: the engine returns the target's
    layer states for the session (``uses_target_hidden``) and ``observe`` fuses them
    into the session's FeatureLog. It drafts nothing here."""

    uses_target_hidden = True
    relays_features = True
    reads_every_position = True  # the worker's drafter attends over every position's features

    def __init__(self, fuse: Callable[[torch.Tensor], torch.Tensor], target_hidden: str, tree: EagleTree,
                 window: int = DEFAULT_WINDOW, device: torch.device | str = "cpu"):
        """``fuse``: EAGLE-3's fc, [n, 3H] -> [n, H]; ``target_hidden``: the layer
        states it reads (core/target.py "layers:..."); ``tree``: the budget the worker
        drafts, told in the open."""
        self.fuse, self.target_hidden, self.tree = fuse, target_hidden, tree
        self.window, self.device = window, device

    @property
    def max_nodes(self) -> int:
        return self.tree.nodes

    def new_state(self) -> FeatureLog:
        return FeatureLog(self.window)

    def restore_state(self, chunks: list[KVChunk]) -> FeatureLog:
        return FeatureLog(self.window)

    @torch.inference_mode()
    def observe(self, state: FeatureLog, start: int, hidden: torch.Tensor) -> None:
        """``hidden`` [n, 3H]: the target's layer states at positions start.. (row i chose token start+i+1)."""
        state.add(start, self.fuse(hidden))

    def propose(self, state, committed: list[int], gamma: int, params: SamplingParams, stop=None) -> Proposal:
        return Proposal.empty(self.device)  # the draft worker drafts


def _joined(pieces: list[tuple[int, torch.Tensor]]) -> tuple[int, torch.Tensor] | None:
    if not pieces:
        return None
    return pieces[0][0], torch.cat([rows for _, rows in pieces]) if len(pieces) > 1 else pieces[0][1]

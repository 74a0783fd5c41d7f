"""Per-request speculative-decoding statistics, returned (never logged) by the engine."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    rounds: int = 0
    drafted: int = 0  # draft tokens scored: a tree's every node
    accepted: int = 0
    rejections: int = 0  # rounds that ended on a rejected draft (not on a bonus token)
    emitted: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    # Accepted drafts by their place among their siblings (a chain's are all rank 0):
    # how often a tree's second, third... candidate saves a round.
    accepted_per_rank: list[int] = field(default_factory=list)
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    total_time_s: float = 0.0
    # Served (distributed) generation only; zero in-process.
    transport_time_s: float = 0.0  # verifier waiting on drafts, less exposed draft compute
    queue_time_s: float = 0.0  # waiting for a session slot or the verifier's compute thread
    exposed_draft_time_s: float = 0.0  # draft compute the verifier waited on
    pipeline_rounds: int = 0  # rounds after which an early block was drafted
    pipeline_hits: int = 0  # ... whose next block the verifier already held (a branch for the outcome)
    # The speculation cache: rounds whose outcome the worker had drafted the next block
    # for (held already, or sent at once when reported), by the outcome's kind: every
    # draft accepted (the bonus guessed) or one rejected (the correction guessed).
    cache_hits_full: int = 0
    cache_hits_partial: int = 0
    branches_drafted: int = 0  # blocks drafted for outcomes, used or not
    cached_prefix_tokens: int = 0  # prompt tokens whose target KV came from a shared prefix
    draft_reconnects: int = 0  # times the session continued on another draft worker
    # Rounds decoded without drafts because no draft worker answered: a seeded sampled
    # stream stays exactly target-distributed, but is then a different draw.
    undrafted_rounds: int = 0
    # Rounds decoded without drafts while a draft worker read the context for its first
    # block: the session did not wait for it.
    reading_rounds: int = 0
    draft_bytes: int = 0  # draft block bytes received on the wire
    feature_bytes: int = 0  # fused target features sent to an EAGLE drafter on a draft worker
    draft_shape: str = ""  # a tree drafter's tree (ChoiceTree.label, e.g. "tree10:4-3-2-1"); "" for chains

    def record_round(self, drafted: int, accepted: int, emitted: int, depth: int | None = None,
                     ranks: list[int] | None = None) -> None:
        """``depth``: the deepest draft's depth (a tree's; a chain's is ``drafted``);
        position i counts as drafted when the round reached that depth. ``ranks``: the
        sibling rank of each accepted draft (a chain's are 0)."""
        depth = drafted if depth is None else depth
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.rejections += accepted < depth
        self.emitted += emitted
        self._cover_positions(depth)
        for i in range(depth):
            self.drafted_per_position[i] += 1
        for i in range(accepted):
            self.accepted_per_position[i] += 1
        for rank in ranks if ranks is not None else [0] * accepted:
            self._grow(self.accepted_per_rank, rank + 1)
            self.accepted_per_rank[rank] += 1

    @staticmethod
    def _grow(counts: list[int], n: int) -> None:
        counts.extend([0] * (n - len(counts)))

    def _cover_positions(self, n: int) -> None:
        grow = n - len(self.drafted_per_position)
        if grow > 0:
            self.drafted_per_position.extend([0] * grow)
            self.accepted_per_position.extend([0] * grow)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def per_token_acceptance(self) -> float:
        """Leviathan's alpha: P(a draft is accepted | it was tested). Drafts after the
        first rejection are never tested, so accepted / drafted underestimates it."""
        tested = self.accepted + self.rejections
        return self.accepted / tested if tested else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per round: accepted drafts plus the correction/bonus token."""
        return 1 + self.accepted / self.rounds if self.rounds else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        return [a / d for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    @property
    def pipeline_hit_rate(self) -> float:
        return self.pipeline_hits / self.pipeline_rounds if self.pipeline_rounds else 0.0

    def record_cache_hit(self, full: bool) -> None:
        if full:
            self.cache_hits_full += 1
        else:
            self.cache_hits_partial += 1

    @property
    def cache_hits(self) -> int:
        return self.cache_hits_full + self.cache_hits_partial

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hits / self.pipeline_rounds if self.pipeline_rounds else 0.0

    @property
    def overlap(self) -> float:
        """Share of draft compute that ran while the target was verifying."""
        if not self.draft_time_s:
            return 0.0
        return max(0.0, 1 - self.exposed_draft_time_s / self.draft_time_s)

    @property
    def tokens_per_s(self) -> float:
        return self.emitted / self.total_time_s if self.total_time_s else 0.0

    def __iadd__(self, other: "GenerationStats") -> "GenerationStats":
        """Accumulate another request's stats (for aggregate benchmark figures)."""
        self._cover_positions(len(other.drafted_per_position))
        for i, (d, a) in enumerate(zip(other.drafted_per_position, other.accepted_per_position)):
            self.drafted_per_position[i] += d
            self.accepted_per_position[i] += a
        self._grow(self.accepted_per_rank, len(other.accepted_per_rank))
        for i, a in enumerate(other.accepted_per_rank):
            self.accepted_per_rank[i] += a
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.draft_shape = self.draft_shape or other.draft_shape
        return self

    def to_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "emitted": self.emitted,
            "rejections": self.rejections,
            "acceptance_rate": self.acceptance_rate,
            "per_token_acceptance": self.per_token_acceptance,
            "mean_acceptance_length": self.mean_acceptance_length,
            "acceptance_per_position": self.acceptance_per_position,
            "accepted_per_rank": list(self.accepted_per_rank),
            "draft_time_s": self.draft_time_s,
            "verify_time_s": self.verify_time_s,
            "total_time_s": self.total_time_s,
            "tokens_per_s": self.tokens_per_s,
            "transport_time_s": self.transport_time_s,
            "queue_time_s": self.queue_time_s,
            "pipeline_rounds": self.pipeline_rounds,
            "pipeline_hits": self.pipeline_hits,
            "pipeline_hit_rate": self.pipeline_hit_rate,
            "cache_hits": self.cache_hits,
            "cache_hit_rate": self.cache_hit_rate,
            "cache_hits_full": self.cache_hits_full,
            "cache_hits_partial": self.cache_hits_partial,
            "branches_drafted": self.branches_drafted,
            "draft_bytes": self.draft_bytes,
            "feature_bytes": self.feature_bytes,
            "draft_shape": self.draft_shape,
            "overlap": self.overlap,
        }


_SUMMED = (
    "rounds", "drafted", "accepted", "rejections", "emitted", "draft_time_s", "verify_time_s", "total_time_s",
    "transport_time_s", "queue_time_s", "exposed_draft_time_s", "pipeline_rounds", "pipeline_hits",
    "cached_prefix_tokens", "draft_reconnects", "undrafted_rounds", "reading_rounds", "draft_bytes", "feature_bytes",
    "cache_hits_full", "cache_hits_partial", "branches_drafted",
)

"""The target model's side of verification: run feeds through the model on top of each
session's cached KV, one forward pass for the whole batch.

``TargetRunner`` owns the KV of every session it serves, in a preallocated paged pool
(core/kv_pool.py), keyed by session id, so that the same runner can sit in the
verifier's process (TP=1) or on each rank of a tensor-parallel group, where every rank
keeps its own head-shard of the cache and only token ids and logits cross process
boundaries.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .kv import forward_logits
from .kv_chunks import KVChunk
from .kv_pool import KVPool, PagedSeq, pass_cache, ragged_inputs, real_rows
from .tree import tree_shape

DEFAULT_KV_CACHE_BYTES = 2 * 2**30
# Hidden states drafting heads read: the final (normed) one the LM head reads, or the
# residual stream before the final norm.
FINAL, PRE_NORM = "final", "pre_norm"
HIDDEN_KINDS = (FINAL, PRE_NORM)
# Or the states entering some decoder layers, concatenated ("layers:2,16,29" -> [n, 3H]):
# the low, middle and high features EAGLE-3 fuses.
LAYERS = "layers:"


def layer_features(layers) -> str:
    return LAYERS + ",".join(str(int(i)) for i in layers)


def feature_layers(kind: str) -> tuple[int, ...]:
    """The decoder layers a ``layers:`` kind reads ((): another kind)."""
    return tuple(int(i) for i in kind[len(LAYERS):].split(",")) if kind.startswith(LAYERS) else ()


@dataclass(frozen=True)
class Feed:
    """One session's share of a forward pass."""

    session: str
    keep: int  # cached positions to keep; the rest (rejected drafts) are dropped first
    tokens: list[int]  # fed after them, and cached
    logits_to_keep: int  # logits wanted for the last positions of ``tokens``
    # The last len(tree) tokens are a draft tree's nodes with these parents (core/tree.py;
    # -1 = the token before them); None = all a chain. Nodes are cached in node order.
    tree: tuple[int, ...] | None = None
    # (from, to) position pairs copied before the pass: last round's accepted tree path,
    # compacted into place. Applied before ``keep`` truncates.
    moves: tuple[tuple[int, int], ...] = ()


class TargetRunner:
    def __init__(self, model, kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES, tp_size: int = 1):
        self.model = model
        self.pool = KVPool.for_model(model, kv_cache_bytes, tp_size)
        self.sessions: dict[str, PagedSeq] = {}
        # (the model's ``device`` walks its parameters: 40 us a pass, asked several times)
        self.device: torch.device = model.device
        self.pack_rows = True  # a lean decoder leaves padded rows out (False: as a benchmark's baseline)

    def forward(self, feeds: list[Feed]) -> list[torch.Tensor]:
        """Logits [logits_to_keep, V] per feed, in order. Raises PoolExhausted, having
        changed nothing, when the pool cannot hold the pass."""
        return self.forward_with_hidden(feeds, ())[0]

    @torch.inference_mode()
    def forward_with_hidden(self, feeds: list[Feed], kinds: tuple[str, ...] = (FINAL,)) -> tuple[list, dict | None]:
        """Logits per feed and, for each of ``kinds`` (HIDDEN_KINDS or ``layers:``), hidden
        states [len(tokens), H] ([.., kH] for k layers) per feed at every fed position: what drafting heads on the
        verifier read (Medusa the last, MTP all of them). {kind: [per feed]}."""
        if len({f.session for f in feeds}) != len(feeds):
            raise ValueError("a session appears twice in one batch")
        if any(not 1 <= f.logits_to_keep <= len(f.tokens) for f in feeds):
            # (more logits than fed tokens would read a padded position's: the root's
            # logits need the last committed token fed, not cached)
            raise ValueError("a feed needs at least one token, and a logit for at most every token it feeds")
        # What each kind reads: FINAL / PRE_NORM, or the states entering some layers.
        wanted = {key: None for kind in kinds for key in (feature_layers(kind) or (kind,))}
        indices = sorted(key for key in wanted if isinstance(key, int))
        if indices and not 0 <= indices[0] <= indices[-1] < (layers := len(_decoder_parts(self.model)[1])):
            missing = ", ".join(str(i) for i in indices if not 0 <= i < layers)
            raise ValueError(f"no decoder layer {missing}: the target has {layers}")
        seqs = [self.sessions.get(f.session) for f in feeds]
        seqs = [PagedSeq() if seq is None else seq for seq in seqs]  # (an empty PagedSeq is falsy)
        for feed, seq in zip(feeds, seqs):
            if feed.keep > len(seq):
                raise ValueError(f"session {feed.session}: keep {feed.keep} > {len(seq)} cached positions")
            if any(not (0 <= dst < feed.keep and 0 <= src < len(seq)) for src, dst in feed.moves):
                raise ValueError(f"session {feed.session}: moves {feed.moves} out of its {len(seq)} positions")
            if feed.tree is not None and len(feed.tree) > len(feed.tokens):
                raise ValueError(f"session {feed.session}: a tree of {len(feed.tree)} nodes in {len(feed.tokens)} tokens")
        self.pool.reserve(seqs, [f.keep + len(f.tokens) for f in feeds])
        for feed, seq in zip(feeds, seqs):
            self.sessions[feed.session] = seq
            self._move(seq, feed.moves)
            del seq.tokens[feed.keep :]  # rollback: a length pointer
        past, new = [f.keep for f in feeds], [len(f.tokens) for f in feeds]
        cache, P, N = pass_cache(self.pool, seqs, past, new)
        device = self.device
        ids = torch.tensor([f.tokens + [0] * (N - len(f.tokens)) for f in feeds], dtype=torch.long)
        if any(f.tree is not None for f in feeds):
            positions, key_positions, allowed = tree_layout(feeds, past, P, N)
            extra = dict(attention_mask=self._tree_masks(allowed, positions, key_positions),
                         position_ids=positions.to(device))
        else:
            extra = ragged_inputs(past, new, device)
        window = max(N - n + f.logits_to_keep for n, f in zip(new, feeds))
        if not wanted or getattr(self.model, "lean_decoder", None) is not None:
            captured = wanted  # the lean decoder keeps them as it goes
            # (only real rows' logits are read below: a padded row's may be left out)
            out = forward_logits(self.model, ids.to(device), cache, window, states=captured or None,
                                 real_rows=real_rows(new) if self.pack_rows else None, **extra)
        else:
            captured = {}
            with _hooked(self.model, wanted, captured):
                out = forward_logits(self.model, ids.to(device), cache, window, **extra)
        logits = []
        for i, (feed, n) in enumerate(zip(feeds, new)):
            end = window - (N - n)
            logits.append(out[i, end - feed.logits_to_keep : end])
            seqs[i].tokens.extend(feed.tokens)
        for kind in kinds:
            if feature_layers(kind):
                captured[kind] = torch.cat([captured[i] for i in feature_layers(kind)], -1)
        states = {kind: [captured[kind][i, :n] for i, n in enumerate(new)] for kind in kinds}
        return logits, states if kinds else None

    def _move(self, seq: PagedSeq, moves: tuple[tuple[int, int], ...]) -> None:
        """Copy positions within a session: an accepted tree path into place. One gather
        and one scatter per layer, for the path's few positions (sources are read before
        any destination is written, so overlapping moves are safe)."""
        if not moves:
            return
        src = self._slots_at(seq, [s for s, _ in moves])
        dst = self._slots_at(seq, [d for _, d in moves])
        for index in range(self.pool.num_layers):
            if self.pool.keys[index] is not None:
                self.pool.keys[index][dst] = self.pool.keys[index][src]
                self.pool.values[index][dst] = self.pool.values[index][src]
        tokens = [seq.tokens[s] for s, _ in moves]
        for (_, d), token in zip(moves, tokens):
            seq.tokens[d] = token

    def _tree_masks(self, allowed: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor):
        """The 4-D additive masks for a pass with tree rows: transformers uses a 4-D mask
        as given, so a sliding window must be in it (a dict per layer type when the
        model mixes full and sliding layers)."""
        dtype, device = self.model.dtype, self.device
        def additive(keep):
            return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)[:, None].to(device)
        text = self.model.config.get_text_config(decoder=True)
        window = getattr(text, "sliding_window", None)
        types = set(getattr(text, "layer_types", None) or ())
        if not window or (types and "sliding_attention" not in types):
            return additive(allowed)
        # transformers' sliding rule: a query at q sees keys at k > q - window.
        sliding = additive(allowed & (positions[:, :, None] - key_positions[:, None, :] < window))
        if types and types != {"sliding_attention"}:
            return {"full_attention": additive(allowed), "sliding_attention": sliding}
        return sliding

    @torch.inference_mode()  # the pool may have been allocated in a forward: writes need the same mode
    def prefill(self, session: str, tokens: list[int], cached: list[KVChunk], reserve: int = 0,
                hidden: str = "") -> torch.Tensor | None:
        """Cache ``tokens`` for a new session, starting from ``cached`` (chunks of a
        shared prefix, computed by any replica) and computing only the rest. ``reserve``:
        positions to hold for the session from the start (its prompt, its budget of new
        tokens and a block of drafts), so that it cannot run out of pool mid-stream.
        With ``hidden`` (a HIDDEN_KINDS kind), returns those hidden states [n, H] at the
        positions it computed (the last n of ``tokens``; None when it computed none)."""
        if sum(len(c.tokens) for c in cached) > len(tokens) or \
                [t for c in cached for t in c.tokens] != tokens[: sum(len(c.tokens) for c in cached)]:
            raise ValueError(f"session {session}: cached chunks are not a prefix of its tokens")
        self.release([session])
        seq = PagedSeq()
        self.pool.reserve([seq], [max(reserve, len(tokens))])
        self.sessions[session] = seq
        self.pool.restore(seq, cached)
        if len(tokens) > len(seq):
            _, states = self.forward_with_hidden([Feed(session, len(seq), tokens[len(seq) :], 1)],
                                                 (hidden,) if hidden else ())
            return states[hidden][0] if hidden else None
        return None

    @torch.inference_mode()
    def export(self, session: str, start: int, end: int) -> KVChunk | None:
        """Positions [start, end) of a session's cache (copied), or None if it has fewer."""
        seq = self.sessions.get(session)
        if seq is None or len(seq) < end or not 0 <= start < end:
            return None
        return self.pool.export(seq, start, end)

    def _slots_at(self, seq: PagedSeq, positions) -> torch.Tensor:
        positions = torch.tensor(list(positions), dtype=torch.long, device=self.pool.device)[None]
        return self.pool.slots(self.pool.table([seq]), positions)[0]

    def release(self, sessions: list[str]) -> None:
        for session in sessions:
            seq = self.sessions.pop(session, None)
            if seq is not None:
                self.pool.release(seq)

    def cached_positions(self) -> int:
        return sum(len(seq) for seq in self.sessions.values())


def tree_layout(feeds: list[Feed], past: list[int], P: int, N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Position ids and attention for a pass where some rows end in a draft tree. Row i
    is laid out [left pad | past_i | new_i | right pad] (P + N columns, as pass_cache
    writes it). A chain token sits at the next position and sees everything before it;
    a tree node sits at (the position of the token before the tree) + its depth and
    sees the past, the chain tokens, and its ancestors and itself (the shape's index
    buffers, copied in: no per-node loop). Returns positions [B, N], key_positions
    [B, P + N] (negative in the left pad) and allowed [B, N, P + N] bool."""
    B = len(feeds)
    positions = torch.zeros(B, N, dtype=torch.long)
    new_allowed = torch.zeros(B, N, N, dtype=torch.bool)
    for i, (feed, p) in enumerate(zip(feeds, past)):
        n = len(feed.tokens)
        t = len(feed.tree) if feed.tree is not None else 0
        c = n - t  # the chain part
        new_allowed[i, :n, :c] = torch.ones(n, c, dtype=torch.bool).tril()  # tree rows see every chain token
        positions[i, :c] = torch.arange(p, p + c)
        if t:
            shape = tree_shape(feed.tree)
            new_allowed[i, c:n, c:n] = shape.ancestors
            positions[i, c:n] = p + c - 1 + shape.depth
        new_allowed[i, n:, n:] = torch.eye(N - n, dtype=torch.bool)  # right pads see themselves (no NaN rows)
        positions[i, n:] = p + n
    past_t = torch.tensor(past)[:, None]
    column = torch.arange(P)[None, :]
    past_allowed = (column >= P - past_t)[:, None, :].expand(B, N, P)
    key_positions = torch.cat([column - (P - past_t), positions], 1)
    return positions, key_positions, torch.cat([past_allowed, new_allowed], -1)


@contextmanager
def _hooked(model, wanted: dict, captured: dict):
    """Hooks on transformers' modules that put the hidden states ``wanted`` names into
    ``captured`` during a forward (a model with no lean decoder)."""
    decoder, layers, norm = _decoder_parts(model)
    hooks = []
    def keep(key, value) -> None:  # (a hook that returns something replaces the output)
        captured[key] = value

    if FINAL in wanted:
        # The decoder's output is the final (normed) hidden state the LM head reads, in
        # any family, at every position (the LM head itself sees only the kept ones).
        hooks.append(decoder.register_forward_hook(lambda m, args, out: keep(FINAL, out[0])))
    if PRE_NORM in wanted:  # the residual stream before the final norm (MiMo's MTP reads it)
        hooks.append(norm.register_forward_hook(lambda m, args, out: keep(PRE_NORM, args[0])))
    for index in sorted(key for key in wanted if isinstance(key, int)):
        hooks.append(layers[index].register_forward_pre_hook(
            lambda m, args, kwargs, index=index: keep(index, args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _decoder_parts(model) -> tuple:
    """(decoder, its layers, its final norm): Llama's names, or GPT-2's (``h``, ``ln_f``)."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        return decoder, decoder.h, decoder.ln_f
    return decoder, layers, decoder.norm

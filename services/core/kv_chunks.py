"""KV state as immutable chunks: what crosses processes through the object store.

A chunk is the KV of a run of *committed* positions [start, start + n). Committed
tokens never change, and a position's KV depends only on the tokens up to it, so a
chunk is valid forever: a session's KV is a list of chunks, a rollback never has to
touch one, and any process with the same model can rebuild a cache from them.

Prefix sharing uses the same chunks, one per block of ``block_size`` tokens, named by
a hash chain (vLLM's prefix-caching scheme): block k's name covers every token of
blocks 0..k and the model it was computed with, so equal names mean equal KV.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .kv import KVState, batchable, new_cache


@dataclass(frozen=True)
class KVChunk:
    start: int  # position of the first token
    tokens: tuple[int, ...]  # [n] the tokens whose KV this is
    keys: tuple[torch.Tensor, ...]  # per layer [1, H_kv, n, D], on the CPU
    values: tuple[torch.Tensor, ...]  # per layer [1, H_kv, n, D], on the CPU

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def exportable(kv: KVState) -> bool:
    """Plain full-attention caches only (sliding-window layers keep extra state)."""
    return len(kv) > 0 and batchable(kv)


def export_chunk(kv: KVState, start: int, end: int) -> KVChunk:
    """A copy of positions [start, end) of ``kv`` (copied: the chunk must not pin or
    alias the live cache, which keeps growing)."""
    if not 0 <= start < end <= len(kv):
        raise ValueError(f"chunk [{start}, {end}) is outside the {len(kv)} cached positions")
    layers = kv.cache.layers
    return KVChunk(
        start=start,
        tokens=tuple(kv.tokens[start:end]),
        keys=tuple(layer.keys[:, :, start:end].to("cpu", copy=True) for layer in layers),
        values=tuple(layer.values[:, :, start:end].to("cpu", copy=True) for layer in layers),
    )


def restore_kv(model, chunks: list[KVChunk]) -> KVState:
    """A cache holding the chunks' positions; they must run contiguously from 0."""
    kv = KVState.empty(model)
    if not chunks:
        return kv
    position = 0
    for chunk in chunks:
        if chunk.start != position:
            raise ValueError(f"chunks are not contiguous: expected start {position}, got {chunk.start}")
        position = chunk.end
    if len(chunks[0].keys) != len(kv.cache.layers):
        raise ValueError("chunks come from a model with a different number of layers")
    device, dtype = model.device, model.dtype
    cache = new_cache(model.config)
    for index, layer in enumerate(cache.layers):
        keys = torch.cat([c.keys[index] for c in chunks], dim=2).to(device, dtype)
        values = torch.cat([c.values[index] for c in chunks], dim=2).to(device, dtype)
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return KVState(cache=cache, tokens=[t for c in chunks for t in c.tokens])


def block_names(tokens: list[int], block_size: int, salt: str) -> list[str]:
    """Name of every full block of ``tokens``: name k hashes ``salt`` (the model) and
    tokens[0 : (k + 1) * block_size]."""
    names, previous = [], salt.encode()
    for end in range(block_size, len(tokens) + 1, block_size):
        block = torch.tensor(tokens[end - block_size : end], dtype=torch.int64).numpy().tobytes()
        previous = hashlib.blake2b(previous + block, digest_size=16).digest()
        names.append(previous.hex())
    return names

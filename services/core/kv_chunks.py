"""KV state as immutable chunks: what crosses processes through the object store.

A chunk is the KV of a run of *committed* positions [start, start + n). Committed
tokens never change, and a position's KV depends only on the tokens up to it, so a
chunk is valid forever: a session's KV is a list of chunks, a rollback never has to
touch one, and any process with the same model can rebuild a cache from them (a
draft state: core/paged_kv.py; a target session: core/target.py).

Prefix sharing uses the same chunks, one per block of ``block_size`` tokens, named by
a hash chain (vLLM's prefix-caching scheme): block k's name covers every token of
blocks 0..k and the model it was computed with, so equal names mean equal KV.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


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


def block_names(tokens: list[int], block_size: int, salt: str) -> list[str]:
    """Name of every full block of ``tokens``: name k hashes ``salt`` (the model) and
    tokens[0 : (k + 1) * block_size]."""
    names, previous = [], salt.encode()
    for end in range(block_size, len(tokens) + 1, block_size):
        block = torch.tensor(tokens[end - block_size : end], dtype=torch.int64).numpy().tobytes()
        previous = hashlib.blake2b(previous + block, digest_size=16).digest()
        names.append(previous.hex())
    return names

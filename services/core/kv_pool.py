"""The target's KV in a preallocated, paged pool (one per verifier replica, one per
tensor-parallel rank).

Each layer's keys and values live in one tensor of fixed size, in blocks of
``BLOCK_TOKENS`` positions; a session owns a block table. Appending writes only the
new positions; rollback moves a length pointer (blocks stay with the session for the
positions it writes next); releasing a session returns its blocks. The pool is sized
once, by bytes, so memory never grows with traffic: a session the pool cannot hold is
refused at admission (``PoolExhausted``, RESOURCE_EXHAUSTED to the client) and every
other session goes on untouched.

Attention stays transformers' own: a pass hands the model a ``Cache`` whose layers
write the new K/V into the pool and return, for each row, the K/V of its positions
gathered from its blocks, laid out as the model's padded-batch attention expects (left
padding, a 2-D mask, position ids). On CPU that gather is what SDPA needs anyway
(a contiguous [B, H, L, D]); it replaces the copy of every session's whole cache into
a new padded tensor plus transformers' own concatenation (two copies a pass) and no
tensor outlives the pass. Why not transformers' paged cache: it belongs to its
continuous-batching ``generate_batch`` loop (its own scheduler, request lifecycle and
packed layout), with no rollback of rejected positions and no sessions that outlive a
call; a paged-attention kernel (flex_attention, FlashAttention's varlen path) that
reads blocks in place is the GPU step after this one.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .errors import PoolExhausted
from .kv_chunks import KVChunk

BLOCK_TOKENS = 16
SCRATCH = 0  # block 0 takes the writes of padding positions and backs the left pads' reads


def kv_bytes_per_token(config, dtype: torch.dtype, tp_size: int = 1) -> int:
    """Bytes of K and V per position over all layers (a rank's shard under TP)."""
    text = config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * max(1, heads // tp_size) * head_dim * dtype.itemsize


@dataclass
class PagedSeq:
    blocks: list[int] = field(default_factory=list)  # the block table
    tokens: list[int] = field(default_factory=list)  # tokens whose KV is in the blocks, in order

    def __len__(self) -> int:
        return len(self.tokens)


class KVPool:
    def __init__(self, num_layers: int, num_blocks: int, device: torch.device | str, dtype: torch.dtype):
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks, got {num_blocks}")
        self.num_layers, self.num_blocks, self.device, self.dtype = num_layers, num_blocks, torch.device(device), dtype
        self.free = list(range(num_blocks - 1, SCRATCH, -1))  # a stack; block 0 is scratch
        # Block tables may share blocks (a draft session's forks, core/paged_kv.py): a block
        # returns to ``free`` when its last holder lets it go. Draft sessions reserve and
        # release from their own threads.
        self.refs = [0] * num_blocks
        self.lock = threading.RLock()
        # Block tables of draft states the collector has freed, returned at the next
        # reserve or count. A finalizer only appends here: it takes no lock, and runs no
        # more Python than that wherever the collector happens to run (inside an
        # ``ast.parse``, code that blocks on a lock tripped CPython 3.11's "AST
        # constructor recursion depth mismatch").
        self.dropped: deque[list[int]] = deque()
        # Per layer [num_blocks * BLOCK_TOKENS, H_kv, D], allocated at the first write,
        # when the head layout (a TP rank's shard included) is known.
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @classmethod
    def for_model(cls, model, kv_cache_bytes: int, tp_size: int = 1) -> "KVPool":
        per_block = kv_bytes_per_token(model.config, model.dtype, tp_size) * BLOCK_TOKENS
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        return cls(layers, max(2, kv_cache_bytes // per_block), model.device, model.dtype)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * BLOCK_TOKENS

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - 1 - self.free_blocks

    @property
    def free_blocks(self) -> int:
        self.reclaim()
        return len(self.free)

    def reclaim(self) -> None:
        """Return the blocks of collected draft states."""
        with self.lock:
            while self.dropped:
                self.drop(self.dropped.popleft())

    def reserve(self, seqs: list[PagedSeq], lengths: list[int]) -> None:
        """Give each seq blocks for ``lengths[i]`` positions, all or nothing."""
        need = [max(0, -(-length // BLOCK_TOKENS) - len(seq.blocks)) for seq, length in zip(seqs, lengths)]
        with self.lock:
            self.check_free(sum(need))
            for seq, n in zip(seqs, need):
                seq.blocks += self.take(n)

    def check_free(self, blocks: int) -> None:
        self.reclaim()
        if blocks > len(self.free):
            raise PoolExhausted(
                f"the KV pool has {len(self.free) * BLOCK_TOKENS} free positions of {self.capacity_tokens} and this "
                f"needs {blocks * BLOCK_TOKENS} more; retry when sessions finish (kv_cache_bytes sizes the pool)"
            )

    def take(self, n: int) -> list[int]:
        """``n`` free blocks, each held once (call under ``lock``, after ``check_free``)."""
        blocks = [self.free.pop() for _ in range(n)]
        for block in blocks:
            self.refs[block] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more holder of each of ``blocks``."""
        with self.lock:
            for block in blocks:
                self.refs[block] += 1

    def drop(self, blocks: list[int]) -> None:
        """Let go of ``blocks`` (emptied in place); each returns to the free stack when
        no one else holds it."""
        with self.lock:
            for block in reversed(blocks):
                self.refs[block] -= 1
                if self.refs[block] == 0:
                    self.free.append(block)
            blocks.clear()

    def release(self, seq: PagedSeq) -> None:
        self.drop(seq.blocks)
        seq.tokens = []

    @torch.inference_mode()  # the pools were made in a forward
    def copy_block(self, src: int, dst: int, positions: int) -> None:
        """The first ``positions`` of block ``src`` into block ``dst``, every layer."""
        for pool in (*self.keys, *self.values):
            if pool is not None:
                pool[dst * BLOCK_TOKENS : dst * BLOCK_TOKENS + positions] = \
                    pool[src * BLOCK_TOKENS : src * BLOCK_TOKENS + positions]

    def slots(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """table [B, blocks] int64, positions [B, L] int64 -> pool slots [B, L]."""
        return table.gather(1, positions // BLOCK_TOKENS) * BLOCK_TOKENS + positions % BLOCK_TOKENS

    def table(self, seqs: list[PagedSeq]) -> torch.Tensor:
        return torch.tensor(block_rows(seqs), dtype=torch.long, device=self.device)

    def layer(self, index: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s pools, allocated once from ``like`` [.., H_kv, .., D]."""
        if self.keys[index] is None:
            shape = (self.num_blocks * BLOCK_TOKENS, like.shape[1], like.shape[-1])
            self.keys[index] = torch.empty(shape, device=self.device, dtype=self.dtype)
            self.values[index] = torch.empty(shape, device=self.device, dtype=self.dtype)
            # Left pads read the scratch block: masked, but 0 x NaN garbage would still be NaN.
            self.keys[index][:BLOCK_TOKENS] = 0
            self.values[index][:BLOCK_TOKENS] = 0
        return self.keys[index], self.values[index]

    def write(self, index: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values [1, H, n, D] (a chunk's layout) into ``slots`` [n]."""
        k_pool, v_pool = self.layer(index, keys)
        k_pool[slots] = keys[0].transpose(0, 1).to(self.device, self.dtype)
        v_pool[slots] = values[0].transpose(0, 1).to(self.device, self.dtype)

    def read(self, index: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots [n] -> keys, values [1, H, n, D] (copies)."""
        return tuple(pool[slots].transpose(0, 1)[None].clone() for pool in (self.keys[index], self.values[index]))

    def seq_slots(self, seq: PagedSeq, start: int, end: int) -> torch.Tensor:
        """The pool slots [end - start] of a session's positions [start, end)."""
        positions = torch.arange(start, end, device=self.device)[None]
        return self.slots(self.table([seq]), positions)[0]

    @torch.inference_mode()
    def export(self, seq: PagedSeq, start: int, end: int) -> KVChunk:
        """A copy of a session's positions [start, end), on the CPU."""
        if not 0 <= start < end <= len(seq):
            raise ValueError(f"chunk [{start}, {end}) is outside the {len(seq)} cached positions")
        slots = self.seq_slots(seq, start, end)
        pairs = [self.read(index, slots) for index in range(self.num_layers)]
        return KVChunk(start=start, tokens=tuple(seq.tokens[start:end]),
                       keys=tuple(k.to("cpu") for k, _ in pairs), values=tuple(v.to("cpu") for _, v in pairs))

    @torch.inference_mode()
    def restore(self, seq: PagedSeq, chunks: list[KVChunk]) -> None:
        """Append the chunks' positions to a session whose blocks hold them already
        (``reserve`` first); they must start at its length and run contiguously."""
        for chunk in chunks:
            if chunk.start != len(seq):
                raise ValueError(f"chunks are not contiguous: expected start {len(seq)}, got {chunk.start}")
            if len(chunk.keys) != self.num_layers:
                raise ValueError("chunks come from a model with a different number of layers")
            slots = self.seq_slots(seq, chunk.start, chunk.end)
            for index in range(self.num_layers):
                self.write(index, slots, chunk.keys[index], chunk.values[index])
            seq.tokens.extend(chunk.tokens)


def block_rows(seqs: list[PagedSeq]) -> list[list[int]]:
    """Each session's block table, padded with the scratch block to the longest."""
    width = max(1, max(len(seq.blocks) for seq in seqs))
    return [seq.blocks + [SCRATCH] * (width - len(seq.blocks)) for seq in seqs]


class PagedLayer(CacheLayerMixin):
    """One layer of one pass: writes the new positions, returns every row's K/V
    [B, H, past + N, D]: gathered from its blocks, or a view of the pool where a lone
    row's positions are one run of slots (``write`` a slice, ``read`` (None, a slice))."""

    is_sliding = False
    is_compileable = False

    def __init__(self, pool: KVPool, index: int, write: torch.Tensor | slice, read: torch.Tensor | tuple, past: int):
        super().__init__()
        self.pool, self.index, self.write_slots, self.read_slots, self.past = pool, index, write, read, past
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        """Nothing to set up: the pool is the storage."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        k_pool, v_pool = self.pool.layer(self.index, key_states)
        B, H, N, D = key_states.shape
        k_pool[self.write_slots] = key_states.transpose(1, 2).reshape(B * N, H, D)
        v_pool[self.write_slots] = value_states.transpose(1, 2).reshape(B * N, H, D)
        if isinstance(self.read_slots, tuple):  # a view
            return k_pool[self.read_slots].transpose(1, 2), v_pool[self.read_slots].transpose(1, 2)
        # index_select, not pool[slots]: on a CPU, advanced indexing of a [B, L] index
        # took 4x as long for the same rows (5.3-6.2 ms against 1.3 ms: 8 rows of 2,049
        # slots of 2 x 64 floats, one thread).
        slots = self.read_slots.reshape(-1)
        length = self.read_slots.shape[1]  # past + new, pads included
        return tuple(pool.index_select(0, slots).view(B, length, H, D).transpose(1, 2) for pool in (k_pool, v_pool))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.past + query_length, 0

    def get_seq_length(self) -> int:
        return self.past

    def get_max_length(self) -> int:
        return -1


def pass_cache(pool: KVPool, seqs: list[PagedSeq], past: list[int], new: list[int]) -> tuple[Cache, int, int]:
    """The Cache for one pass that feeds ``new[i]`` positions after ``past[i]`` to row i.
    Row i's layout is [left pad | its past | its new positions | right pad], P + N long,
    as the model's padded-batch attention expects. Returns (cache, P, N)."""
    P, N = max(past), max(new)
    run = contiguous_run(seqs[0], P + N) if len(seqs) == 1 else None
    if run is not None:
        # One session whose positions sit in consecutive blocks (a session reserves its
        # budget at admission, and the free stack hands out ascending blocks): attention
        # reads the pool in place. Batch-1 decoding is where a gather per layer costs most
        # next to the model's own work, about 1 ms a token for the bundled target.
        write, read = slice(run + P, run + P + N), (None, slice(run, run + P + N))  # read: a [1, L, H, D] view
        return Cache(layers=[PagedLayer(pool, index, write, read, P) for index in range(pool.num_layers)]), P, N
    device = pool.device
    # Lengths and block tables cross to the device in one copy: [B, 2 + blocks].
    rows = torch.tensor([[p, n] + blocks for p, n, blocks in zip(past, new, block_rows(seqs))],
                        dtype=torch.long).to(device)
    past_t, new_t, table = rows[:, :1], rows[:, 1:2], rows[:, 2:]
    j = torch.arange(N, device=device)[None, :]
    write = torch.where(j < new_t, pool.slots(table, (past_t + j).clamp(max=table.shape[1] * BLOCK_TOKENS - 1)), SCRATCH)
    k = torch.arange(P, device=device)[None, :] - (P - past_t)  # position of read column k, < 0 in the left pad
    read_past = torch.where(k >= 0, pool.slots(table, k.clamp(min=0)), SCRATCH)
    read = torch.cat([read_past, write], 1)  # [B, P + N]
    layers = [PagedLayer(pool, index, write.reshape(-1), read, P) for index in range(pool.num_layers)]
    return Cache(layers=layers), P, N


def ragged_inputs(past: list[int], new: list[int], device) -> dict:
    """The attention mask [B, P + N] (host) and position ids [B, N] of a pass whose rows
    differ in cached or fed length (pass_cache's layout): both pads masked, positions
    counted from each row's own start. Nothing when every row is alike."""
    if len(set(past)) == 1 and len(set(new)) == 1:
        return {}
    P, N = max(past), max(new)
    mask = torch.zeros(len(past), P + N, dtype=torch.long)
    for i, (p, n) in enumerate(zip(past, new)):
        mask[i, P - p : P + n] = 1
    positions = torch.tensor(past)[:, None] + torch.arange(N)[None, :]
    return dict(attention_mask=mask, position_ids=positions.to(device))  # the mask moves in forward_logits


def real_rows(new: list[int]) -> torch.Tensor:
    """[B, N] bool (host): which query rows of a right-padded pass are fed tokens, N the
    longest feed (pass_cache's layout, and a tree pass's)."""
    return torch.arange(max(new))[None, :] < torch.tensor(new)[:, None]


def contiguous_run(seq: PagedSeq, length: int) -> int | None:
    """The first pool slot of a session's positions [0, length) when they are one run
    of slots (its blocks consecutive), else None."""
    blocks = seq.blocks[: -(-length // BLOCK_TOKENS)]
    if not blocks or len(blocks) * BLOCK_TOKENS < length or any(b - a != 1 for a, b in zip(blocks, blocks[1:])):
        return None
    return blocks[0] * BLOCK_TOKENS

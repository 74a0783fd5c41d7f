"""A model's forward pass as plain tensor ops over its own weights: the draft's steps
and the verifier's passes.

Why by hand: a draft step computes almost nothing (the bundled draft: one layer of
width 256), so its cost is whatever surrounds the arithmetic. transformers' forward
builds a mask through its mask interface, walks decorators, kwargs and output
dataclasses at every module, and runs each projection as its own op. Measured on this
2-core CPU, bundled draft, one row, context 120-400: 2.9-3.2 ms a step through
transformers, 2.0-2.3 ms here, bit-identical logits. The same holds for a verifier's
pass wherever the host is the bottleneck (a GPU, where these ops are kernel
launches): at width 64 and 6 layers, where the arithmetic is nothing, a pass takes
0.56-0.65 of transformers' host time, at 1 and at 9 positions.

It covers the Llama-shaped families (Llama, Qwen2, Mistral: RMSNorm, RoPE from the
model's own rotary module, so every rope scaling it knows, grouped-query attention,
SwiGLU, sliding windows) and GPT-2 (LayerNorm, learned positions, Conv1D projections,
its activation and attention scaling). ``lean_decoder`` returns None for any other model, which
then runs transformers' forward (with hooks on its modules where drafting heads read
hidden states; here a pass keeps them itself, ``states``). The cache is any
transformers ``Cache``: a layer's new K/V go through its own ``update``, so the KV
pools' paged layers, rollback, forks and batching (core/kv_pool.py, core/paged_kv.py)
see exactly what transformers' forward leaves.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.pytorch_utils import Conv1D

from ..core.target import FINAL, PRE_NORM

ROPE_MODEL_TYPES = {"llama", "mistral", "qwen2"}  # and GPT-2, on its own path


class LeanDecoder:
    """``decoder(ids, cache, logits_to_keep, attention_mask, position_ids)`` equals
    ``model(input_ids=ids, attention_mask=..., position_ids=..., cache=cache,
    logits_to_keep=...).logits`` and leaves the same cache behind."""

    def __init__(self, model):
        config = model.config
        self.head = model.lm_head.weight
        self.heads = config.num_attention_heads
        if config.model_type == "gpt2":
            inner = model.transformer
            self.embed, self.position_table, self.rotary = inner.wte.weight, inner.wpe.weight, None
            self.norm = _layer_norm(inner.ln_f)
            self.kv_heads, self.head_dim = self.heads, config.hidden_size // self.heads
            self.layers = [_LeanGPT2Layer(block) for block in inner.h]
        else:
            inner = model.model
            self.embed, self.position_table, self.rotary = inner.embed_tokens.weight, None, inner.rotary_emb
            self.norm = _rms(inner.norm)
            self.kv_heads = config.num_key_value_heads
            self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
            self.layers = [_LeanLayer(layer, window) for layer, window in zip(inner.layers, _windows(config))]

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache, logits_to_keep: int = 0,
                 attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                 states: dict | None = None, real_rows: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, N]; position_ids [B, N] or None (then they follow the cache);
        attention_mask: None, [B, P + N] on the host (1 = a real token, P = the cache's
        length), or as a verifier's tree pass gives transformers: an additive 4-D mask
        [B, 1, N, P + N], or one per layer type ({"full_attention": .., "sliding_attention":
        ..}). Returns logits [B, logits_to_keep or N, V].

        ``states``: the hidden states to keep, filled in place, each [B, N, d] at every
        fed position: its keys name them, FINAL (the normed output the LM head reads),
        PRE_NORM (the residual stream before that norm) or a layer index (the state
        entering that layer), what a hook on transformers' module would have seen.

        ``real_rows`` [B, N] (host bool): the query rows fed real tokens; the others (a
        right-padded pass's, a chain's or a tree's) are left out of the token-wise work
        (``_Packed``), their logits then undefined, so only for a caller that never reads
        them (core/target.py)."""
        fused = getattr(self.layers[0], "qkv_weight", None)
        if fused is not None and (fused.device != self.embed.device or fused.dtype != self.embed.dtype):
            # The fused projections are tensors of their own, which ``model.to`` does not move.
            raise RuntimeError("the model was moved or cast after its lean decoder was made: "
                               "call use_lean_decoding again")
        B, N = ids.shape
        if position_ids is None:
            past = cache.get_seq_length()
            position_ids = torch.arange(past, past + N, device=ids.device)[None].expand(B, N)
        packed = _Packed.of(real_rows, ids.device)
        if packed is not None:  # from here on the token-wise tensors are [1, M, ..]
            ids = packed.pack(ids)
        hidden = F.embedding(ids, self.embed)  # [B, N, d]
        if self.rotary is not None:  # (it reads only the dtype and device of hidden)
            rope = self.rotary(hidden, position_ids)  # (cos, sin), [B, N, head_dim] each: attention's layout
        else:  # learned absolute positions (GPT-2)
            positions = position_ids if packed is None else packed.pack(position_ids.expand(B, N))
            rope, hidden = None, hidden + F.embedding(positions, self.position_table)
        masks = _Masks(attention_mask, N, ids.device)
        masks.packed = packed
        wanted = states if states is not None else {}
        padded = packed.pad if packed is not None else (lambda x: x)
        for index, layer in enumerate(self.layers):
            if index in wanted:
                wanted[index] = padded(hidden)
            hidden = layer(self, hidden, rope, cache, index, masks)
        if PRE_NORM in wanted:
            wanted[PRE_NORM] = padded(hidden)
        if FINAL in wanted:  # every position normed: heads read them all
            hidden = self.norm(hidden)
            wanted[FINAL] = padded(hidden)
            if packed is not None:
                return packed.logits(hidden, logits_to_keep or N, lambda x: F.linear(x, self.head))
            return F.linear(hidden[:, -logits_to_keep:] if logits_to_keep else hidden, self.head)
        if packed is not None:
            return packed.logits(hidden, logits_to_keep or N, lambda x: F.linear(self.norm(x), self.head))
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return F.linear(self.norm(hidden), self.head)


class _Packed:
    """The real query rows of a right-padded pass (sessions that feed different numbers
    of tokens), packed into one row [1, M, ..]: norms, projections, the MLP and the LM
    head run on those M rows only, attention on the padded layout [B, N, ..] it needs.
    Why: where a pass is compute-bound (a CPU; a GPU at large batch) a padded row
    costs what a real one does. Measured on this CPU, bundled target, 15 sessions at
    context 120, one of them drafting 3 tokens: 38.7 ms padded (60 rows for 18 real)
    against 18.5 ms for one token each."""

    def __init__(self, real: torch.Tensor, device):  # real [B, N] bool, on the host
        self.B, self.N = real.shape
        rows = real.flatten().nonzero().squeeze(1)  # [M], on the host: no device sync
        self.host_rows, self.rows = rows, rows.to(device)

    @staticmethod
    def of(real: torch.Tensor | None, device) -> "_Packed | None":
        """For real rows [B, N] (host) of which an eighth or more are pads. Measured on
        this CPU (``python -m services.bench.ragged --drafting K``, 15 sessions, 1 or 3
        drafts each for K of them), packed over padded: 0.84 / 0.68 at 63% / 45% real
        rows, 0.91 at 87%, 0.95 / 0.96 at 93% / 90%, 1.00-1.02 at 95-97%, where the
        scatter and gather each layer cost what the pads do. (On a GPU, where a small
        pass is bound by the host, not measured.)"""
        if real is None or real.shape[1] == 1:
            return None
        return _Packed(real, device) if 8 * int(real.sum()) <= 7 * real.numel() else None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, ..] -> [1, M, ..]"""
        return x.reshape(self.B * self.N, *x.shape[2:]).index_select(0, self.rows)[None]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[1, M, ..] -> [B, N, ..], zeros in the pads."""
        out = x.new_zeros(self.B * self.N, *x.shape[2:])
        return out.index_copy_(0, self.rows, x[0]).view(self.B, self.N, *x.shape[2:])

    def logits(self, hidden: torch.Tensor, keep: int, head) -> torch.Tensor:
        """[B, keep, V] from the real rows among the last ``keep`` columns of ``hidden``
        [1, M, d]; a padded row's are undefined (never read)."""
        cols = self.host_rows % self.N
        kept = (cols >= self.N - keep).nonzero().squeeze(1)
        where = (self.host_rows[kept] // self.N) * keep + cols[kept] - (self.N - keep)
        device = hidden.device
        logits = head(hidden[0].index_select(0, kept.to(device)))  # [M', V]
        out = logits.new_empty(self.B * keep, logits.shape[-1])
        return out.index_copy_(0, where.to(device), logits).view(self.B, keep, -1)


class _LeanLayer:
    """A Llama-shaped decoder layer: RMSNorm, RoPE, grouped-query attention, SwiGLU."""

    def __init__(self, layer, window: int | None):
        attn, mlp = layer.self_attn, layer.mlp
        # One projection for q, k, v and one for gate, up: three ops fewer a layer. The
        # module's weights become views of the fused ones, so no memory is added.
        self.qkv_weight = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.qkv_bias = None if attn.q_proj.bias is None else torch.cat(
            [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).detach()
        self.gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
        self.o_proj, self.down = attn.o_proj.weight, mlp.down_proj.weight
        self.input_norm, self.post_norm = _rms(layer.input_layernorm), _rms(layer.post_attention_layernorm)
        self.window, self.scale = window, attn.scaling

    def __call__(self, model: LeanDecoder, hidden, rope, cache, index: int, masks: "_Masks") -> torch.Tensor:
        H, Hkv, D = model.heads, model.kv_heads, model.head_dim
        qkv = masks.unpack(F.linear(self.input_norm(hidden), self.qkv_weight, self.qkv_bias))
        B, N, _ = qkv.shape
        q, k, v = qkv.view(B, N, H + 2 * Hkv, D).transpose(1, 2).split([H, Hkv, Hkv], dim=1)  # [B, heads, N, D]
        q, k = apply_rotary_pos_emb(q, k, *rope)
        k, v = cache.update(k, v, index)  # [B, Hkv, P + N, D]
        mask = masks.get(self.window, k.shape[2])
        if mask is not None and q.device.type != "cpu" and H != Hkv:
            # CUDA's fused kernels take grouped K/V only without a mask (as in transformers).
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=H != k.shape[1])
        hidden = hidden + F.linear(masks.repack(attn.transpose(1, 2).flatten(2)), self.o_proj)
        gate, up = F.linear(self.post_norm(hidden), self.gate_up).chunk(2, dim=-1)
        return hidden + F.linear(F.silu(gate) * up, self.down)


class _LeanGPT2Layer:
    """GPT-2's block: LayerNorm, the fused c_attn, multi-head attention at the module's
    own scaling (which may divide by the layer's index), its activation. Its Conv1D
    projections are ``x @ W + b`` with W [in, out], run as transformers runs them
    (``addmm``), so nothing is copied or transposed."""

    def __init__(self, block):
        attn, mlp = block.attn, block.mlp
        self.ln_1, self.ln_2 = _layer_norm(block.ln_1), _layer_norm(block.ln_2)
        self.qkv, self.o = (attn.c_attn.weight, attn.c_attn.bias), (attn.c_proj.weight, attn.c_proj.bias)
        self.fc, self.proj = (mlp.c_fc.weight, mlp.c_fc.bias), (mlp.c_proj.weight, mlp.c_proj.bias)
        self.act = mlp.act.forward  # (the module's forward: no hook machinery)
        self.scale = attn.scaling

    def __call__(self, model: LeanDecoder, hidden, rope, cache, index: int, masks: "_Masks") -> torch.Tensor:
        H, D = model.heads, model.head_dim
        qkv = masks.unpack(_conv1d(self.ln_1(hidden), *self.qkv))
        B, N, _ = qkv.shape
        q, k, v = qkv.view(B, N, 3 * H, D).transpose(1, 2).split(H, dim=1)  # [B, H, N, D]
        k, v = cache.update(k, v, index)  # [B, H, P + N, D]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=masks.get(None, k.shape[2]), scale=self.scale)
        hidden = hidden + _conv1d(masks.repack(attn.transpose(1, 2).flatten(2)), *self.o)
        return hidden + _conv1d(self.act(_conv1d(self.ln_2(hidden), *self.fc)), *self.proj)


class _Masks:
    """Each layer's attention mask, built once a pass per window. From a 2-D padding
    mask (or none): boolean [B, 1, N, L] (True = attend) over the L = P + N keys a
    layer returns, causal, hiding the padding, and for a sliding layer the keys
    ``window`` or more positions back (transformers' rule); None where nothing is
    hidden (one query over a cache with no padding). A 4-D mask, or one per layer type,
    is used as given (it already holds the tree, the padding and the window)."""

    def __init__(self, attention_mask, N: int, device):
        self.given = None
        self.padding = None
        if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.dim() == 4):
            self.given = attention_mask
        elif attention_mask is not None and not bool(attention_mask.all()):
            # Read on the host (core/kv_pool.py builds it there): no device sync to find out.
            self.padding = attention_mask.to(device).bool()
        self.N, self.device = N, device
        self.built: dict[int | None, torch.Tensor | None] = {}
        self.packed: _Packed | None = None  # the pass's real rows, when packed

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """A token-wise tensor in attention's padded layout [B, N, ..]."""
        return x if self.packed is None else self.packed.pad(x)

    def repack(self, x: torch.Tensor) -> torch.Tensor:
        """Attention's output [B, N, ..] as the token-wise layout: packed, if the pass is."""
        return x if self.packed is None else self.packed.pack(x)

    def get(self, window: int | None, keys: int) -> torch.Tensor | None:
        if self.given is not None:
            if isinstance(self.given, dict):
                return self.given["full_attention" if window is None else "sliding_attention"]
            return self.given
        if window not in self.built:
            self.built[window] = self._build(window, keys)
        return self.built[window]

    def _build(self, window: int | None, keys: int) -> torch.Tensor | None:
        N = self.N
        if N == 1 and self.padding is None and (window is None or keys <= window):
            return None
        query = torch.arange(keys - N, keys, device=self.device)[:, None]  # [N, 1]: each query's column
        key = torch.arange(keys, device=self.device)[None, :]  # [1, L]
        allowed = key <= query
        if window is not None:
            allowed = allowed & (key > query - window)
        allowed = allowed[None, None]  # [1, 1, N, L]
        if self.padding is not None:
            allowed = allowed & self.padding[:, None, None, :]
        return allowed


def attention(attn: nn.Module, x: torch.Tensor, rope, mask, cache, index: int) -> torch.Tensor:
    """A Llama-shaped attention module's forward as plain ops over its own weights,
    unfused (so differentiable, and nothing copied): what drafting layers outside the
    target run (EAGLE-3's midlayer, MTP's blocks), where a step is one row and the
    modules' machinery is most of its host time. x [B, n, in] -> [B, n, H]; ``rope``
    (cos, sin); ``mask``: additive or boolean [B, 1, n, keys], or None (every cached
    key and the row itself); the new K/V go through ``cache.update(.., index)``."""
    B, n, _ = x.shape
    q, k, v = (F.linear(x, proj.weight, proj.bias).view(B, n, -1, attn.head_dim).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))  # [B, heads, n, D]
    q, k = apply_rotary_pos_emb(q, k, *rope)
    if cache is not None:
        k, v = cache.update(k, v, index)
    grouped = q.shape[1] != k.shape[1]
    if grouped and mask is not None and q.device.type != "cpu":
        # CUDA's fused kernels take grouped K/V only without a mask (as in transformers).
        groups = q.shape[1] // k.shape[1]
        k, v, grouped = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=grouped)
    return F.linear(out.transpose(1, 2).reshape(B, n, -1), attn.o_proj.weight, attn.o_proj.bias)


def gated_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama-shaped MLP's forward as plain ops over its weights: down(act(gate(x)) * up(x))."""
    gate, up = (F.linear(x, proj.weight, proj.bias) for proj in (mlp.gate_proj, mlp.up_proj))
    return F.linear(mlp.act_fn(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)


def plain_layer(layer: nn.Module) -> bool:
    """Whether ``attention`` and ``gated_mlp`` compute this decoder layer's parts: Llama's
    shape, plain linear projections, no q/k norms, a dense gated MLP (not MoE)."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (attn, "o_proj"),
             (mlp, "gate_proj"), (mlp, "up_proj"), (mlp, "down_proj")]
    if attn is None or mlp is None or any(type(getattr(m, name, None)) is not nn.Linear for m, name in names):
        return False
    return (getattr(attn, "q_norm", None) is None and getattr(attn, "k_norm", None) is None
            and hasattr(attn, "scaling") and hasattr(mlp, "act_fn"))


def _rms(norm: nn.Module):
    return partial(_rms_norm, weight=norm.weight, eps=norm.variance_epsilon)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' LlamaRMSNorm, op for op (fp32 statistics, the weight in x's dtype).
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _layer_norm(norm: nn.LayerNorm):
    return partial(F.layer_norm, normalized_shape=norm.normalized_shape, weight=norm.weight, bias=norm.bias,
                   eps=norm.eps)


def _conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # transformers' Conv1D: x [..., in] @ weight [in, out] + bias.
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], -1)


def _fuse(linears: list[nn.Linear]) -> torch.Tensor:
    fused = torch.cat([linear.weight.detach() for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return fused


def _windows(config) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as transformers reads it."""
    n, window = config.num_hidden_layers, getattr(config, "sliding_window", None)
    if config.model_type == "mistral":  # every layer slides when a window is set
        return [window] * n
    types = getattr(config, "layer_types", None) or ["full_attention"] * n
    return [window if kind == "sliding_attention" else None for kind in types]


def lean_decoder(model) -> LeanDecoder | None:
    """A ``LeanDecoder`` for ``model``, or None where it does not apply (another family,
    other activations or biases, quantized projections)."""
    config = model.config
    if config.model_type == "gpt2":
        return _gpt2_decoder(model)
    if config.model_type not in ROPE_MODEL_TYPES or getattr(config, "hidden_act", None) != "silu":
        return None
    if getattr(config, "mlp_bias", False):
        return None
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(type(p) is not nn.Linear for p in projections) or attn.o_proj.bias is not None:
            return None
        if (attn.q_proj.bias is None) != (attn.k_proj.bias is None) or (attn.k_proj.bias is None) != (attn.v_proj.bias is None):
            return None
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            return None
    return LeanDecoder(model)


def _gpt2_decoder(model) -> LeanDecoder | None:
    config = model.config
    if config.add_cross_attention or config.reorder_and_upcast_attn:
        return None
    for block in model.transformer.h:
        parts = [block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj]
        if any(type(p) is not Conv1D for p in parts) or type(block.ln_1) is not nn.LayerNorm:
            return None
    return LeanDecoder(model)


def use_lean_decoding(model):
    """Give ``model`` a ``lean_decoder`` where one applies (core/kv.py ``forward_logits``
    runs it in place of the model's forward), once the model is on its device and in its dtype. Returns
    the model."""
    model.lean_decoder = lean_decoder(model)
    return model

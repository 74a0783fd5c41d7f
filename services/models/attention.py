"""The attention Outrider's models run: transformers' SDPA, except that on a CPU a
grouped-query model's K/V heads are not copied once per query head.

transformers hands SDPA ``enable_gqa`` only when there is no mask (CUDA's kernels fall
back to the math kernel with one); otherwise it repeats K and V to every query head
(``repeat_kv``). Outrider's passes nearly always carry a mask: a verify pass feeds a
row's drafts after its past, and a batch's rows differ in length. On a CPU that copy
is most of the attention's time: at batch 8, 9 queries a row and 4,104 keys, with 8
query heads over 2 K/V heads, SDPA took 24 ms after the repeat and 2.6 ms with
``enable_gqa``, for equal outputs (this 2-core machine). So on a CPU this passes the
mask and ``enable_gqa`` to SDPA; everywhere else it is transformers' function as is.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

OUTRIDER_SDPA = "outrider_sdpa"


def outrider_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, N, D], key and value [B, H_kv, L, D], a mask [B, 1, N, L] or None."""
    if (query.device.type == "cpu" and attention_mask is not None and getattr(module, "num_key_value_groups", 1) > 1
            and query.shape[2] > 1 and key.shape[-1] == value.shape[-1] and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None and not kwargs.get("output_attentions", False)):
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


AttentionInterface.register(OUTRIDER_SDPA, outrider_sdpa)
AttentionMaskInterface.register(OUTRIDER_SDPA, sdpa_mask)  # the masks SDPA takes


def use_outrider_attention(model):
    """Switch a model that runs transformers' SDPA to ``outrider_sdpa`` (others, eager
    or flash attention, are left as they are). Returns the model."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(OUTRIDER_SDPA)
    return model

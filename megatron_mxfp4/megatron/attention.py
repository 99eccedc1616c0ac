"""Megatron's local core attention computed by PyTorch's fused `scaled_dot_product_attention`.

megatron-core's local spec builds `DotProductAttention`, which materializes the [b·np, sq, sk] score matrix
(two batched GEMMs around a separate softmax and dropout): at sequence 2048 it is most of a GPT-1.3B step on an
H200. `SDPAttention` keeps its interface, parameters (none) and state dict, and hands the same product to
`torch.nn.functional.scaled_dot_product_attention`, which picks a fused kernel (flash or memory-efficient
attention on GPUs). The mathematics is the same: scale 1/sqrt(head dim) (the query-key layer scaling of
`apply_query_key_layer_scaling` cancels in Megatron as well), the causal mask of a causal layer (and Megatron's
`attention_mask` when one is passed: True = masked; pass none for plain causal attention, so that PyTorch can
choose its flash kernel, which an explicit mask rules out), dropout on the attention probabilities drawn inside the
model-parallel RNG tracker as Megatron draws it. The rounding differs (the softmax is computed blockwise), and
the dropout pattern is the fused kernel's own. Context parallelism, packed sequences, attention bias, sliding
windows and softmax offsets stay with Transformer Engine's spec, as in megatron-core's local attention.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """`DotProductAttention` through `F.scaled_dot_product_attention` (see the module docstring).
    query [sq, b, np, hn], key / value [sk, b, ng, hn] -> context [sq, b, np·hn]."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.softmax_offset is not None:
            raise ValueError(f"SDPAttention: softmax_type {self.config.softmax_type!r} is not supported "
                             "(use the local DotProductAttention or Transformer Engine's spec)")
        if self.scale_mask_softmax.window_size is not None:
            raise ValueError("SDPAttention: sliding-window attention is not supported (use Transformer Engine's spec)")
        # the scale the scores get in DotProductAttention: softmax_scale there is divided by the layer-scaling
        # coefficient and the softmax multiplies it back
        coeff = self.layer_number if self.config.apply_query_key_layer_scaling else 1
        self.sdpa_scale = self.softmax_scale * coeff

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention: packed sequences and attention bias need Transformer Engine's spec")
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:  # grouped-query attention: repeat the key / value heads, as DotProductAttention does
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        mask = None
        if attention_mask is not None:
            mask = ~attention_mask  # Megatron: True = masked out; SDPA: True = attend
            if causal:
                sq, sk = q.shape[2], k.shape[2]
                mask = mask & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
                causal = False
        p = self.attention_dropout.p if self.training else 0.0

        def attend():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                  scale=self.sdpa_scale)

        if p and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        # [b, np, sq, hn] -> [sq, b, np·hn]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(*context.shape[:2], self.hidden_size_per_partition)


def use_sdpa(layer_spec):
    """`layer_spec` (a local GPT layer spec, MXFP4 or not) with its core attention replaced by `SDPAttention`,
    in place; returns it. Specs whose attention is not megatron-core's local `DotProductAttention` (Transformer
    Engine's, an MoE layer's experts have none) are refused in one line."""
    attn = getattr(getattr(layer_spec, "submodules", None), "self_attention", None)
    core = getattr(getattr(attn, "submodules", None), "core_attention", None)
    if core is not DotProductAttention:
        raise ValueError(f"use_sdpa: the layer spec's core attention is {getattr(core, '__name__', core)!r}, not "
                         "megatron-core's local DotProductAttention (Transformer Engine's spec has its own fused "
                         "attention)")
    attn.submodules.core_attention = SDPAttention
    return layer_spec

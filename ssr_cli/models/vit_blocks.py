"""The blocks of an open_clip ViT written out, with their attention probabilities at hand:
``block_attention`` (recomputed from a block's ``ln_1`` output), ``self_attention`` and
``block_forward``. Layouts are NLD (batch, tokens, width).

Imports torch: import this module lazily.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def block_attention(block: Any, ln1: torch.Tensor, average_heads: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of one block, recomputed from its ``ln_1`` output (in fp32).

    ``ln1``: [N, L, D] (NLD). Returns [N, L, L] (head-averaged) or [N, H, L, L].
    """
    attn = block.attn
    n, length, width = ln1.shape
    heads = attn.num_heads
    head_dim = width // heads
    weight = attn.in_proj_weight.float()
    bias = attn.in_proj_bias.float() if attn.in_proj_bias is not None else None
    x = ln1.float()
    q = F.linear(x, weight[:width], None if bias is None else bias[:width])
    k = F.linear(x, weight[width : 2 * width], None if bias is None else bias[width : 2 * width])
    q = q.view(n, length, heads, head_dim).transpose(1, 2)
    k = k.view(n, length, heads, head_dim).transpose(1, 2)
    probs = torch.softmax((q * head_dim**-0.5) @ k.transpose(-1, -2), dim=-1)
    return probs.mean(dim=1) if average_heads else probs


def self_attention(
    attn: Any, x: torch.Tensor, need_probs: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``attn`` (an ``nn.MultiheadAttention``) with ``x`` [N, L, D] (NLD) as query, key and value,
    written out: per head softmax(q k^T / sqrt(d)) v, then ``out_proj``; no mask, no dropout.

    These are the operations of torch's own CPU path (for ViT-B/16 in fp32 on the CPU the
    block's output matched open_clip's bit for bit), with the probabilities at hand:
    ``need_probs`` also returns them averaged over heads [N, L, L] (what ``block_attention``
    recomputes from q and k), at the cost of that mean only.
    """
    n, length, width = x.shape
    heads = attn.num_heads
    head_dim = width // heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(n, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    probs = torch.softmax((q * head_dim**-0.5) @ k.transpose(-1, -2), dim=-1)
    mixed = (probs @ v).transpose(1, 2).reshape(n, length, width)
    out = F.linear(mixed, attn.out_proj.weight, attn.out_proj.bias)
    return out, (probs.mean(dim=1) if need_probs else None)


def block_forward(
    block: Any, x: torch.Tensor, need_probs: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One open_clip ``ResidualAttentionBlock`` on NLD tokens with ``self_attention``: the block's
    output [N, L, D] and, with ``need_probs``, its head-averaged attention [N, L, L]."""
    out, probs = self_attention(block.attn, block.ln_1(x), need_probs)
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x))), probs

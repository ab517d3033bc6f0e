"""Decode attention: one query token per sequence against the paged KV cache.

The Triton kernels (GQA-packed, split-K with a merge step) and their launcher live above
`decode_attention_reference` (kernels issue). Cache layout as in attention_prefill.
"""

from __future__ import annotations

import torch


def decode_attention_reference(
    q: torch.Tensor,  # [B, q_heads, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, tokens in the cache for each sequence (incl. the current one)
    sm_scale: float,
) -> torch.Tensor:
    """Returns out [B, q_heads, D] (q's dtype); softmax in fp32."""
    batch, q_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    max_len = int(seq_lens.max())
    positions = torch.arange(max_len, device=q.device)
    blocks = block_tables[:, positions // block_size].to(torch.int64)  # [B, L]
    offsets = (positions % block_size).expand(batch, -1)
    keys = k_cache[blocks, offsets].float().repeat_interleave(group, dim=2)  # [B, L, Hq, D]
    values = v_cache[blocks, offsets].float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,blhd->bhl", q.float(), keys) * sm_scale
    valid = positions[None, :] < seq_lens[:, None].to(positions.dtype)  # [B, L]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhl,blhd->bhd", torch.softmax(scores, dim=-1), values).to(q.dtype)

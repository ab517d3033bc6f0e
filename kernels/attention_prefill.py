"""Causal prefill attention over ragged (variable-length packed) sequences, writing K/V into the paged cache.

The Triton kernel and its launcher live above `prefill_attention_reference` (kernels issue).
Paged cache layout (vLLM's): k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim];
token t of sequence s lives in block block_tables[s, t // block_size] at slot t % block_size.
"""

from __future__ import annotations

import torch


def write_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter k, v [T, kv_heads, D] into the paged caches at flat slots [T] (block * block_size + offset)."""
    block_size = k_cache.shape[1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, offsets] = v.to(v_cache.dtype)


def prefill_slot_mapping(cu_seqlens: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache slot [T] of each packed token; sequence s holds positions 0..len_s-1."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device),
                                      torch.tensor(lengths, device=cu_seqlens.device))
    positions = torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - cu_seqlens[seq_ids]
    blocks = block_tables[seq_ids, positions // block_size].to(torch.int64)
    return blocks * block_size + positions % block_size


def prefill_attention_reference(
    q: torch.Tensor,  # [T, q_heads, D], T = total packed tokens
    k: torch.Tensor,  # [T, kv_heads, D]
    v: torch.Tensor,  # [T, kv_heads, D]
    cu_seqlens: torch.Tensor,  # [B + 1] int32, start of each sequence in the packing
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    sm_scale: float,
) -> torch.Tensor:
    """Returns out [T, q_heads, D] (q's dtype); softmax in fp32. Also writes k, v into the cache."""
    write_kv_reference(k, v, k_cache, v_cache, prefill_slot_mapping(cu_seqlens, block_tables, k_cache.shape[1]))
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs = q[start:end].float().transpose(0, 1)  # [Hq, L, D]
        ks = k[start:end].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:end].float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qs @ ks.transpose(1, 2)) * sm_scale  # [Hq, L, L]
        length = end - start
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out[start:end] = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1).to(q.dtype)
    return out

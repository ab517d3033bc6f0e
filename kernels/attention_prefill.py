"""Causal prefill attention over ragged (variable-length packed) sequences, writing K/V into the paged cache.

Paged cache layout (vLLM's): k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim];
token t of sequence s lives in block block_tables[s, t // block_size] at slot t % block_size.

The Triton kernel is a FlashAttention-2 forward (online softmax in exp2, fp32 accumulators): one
program per (query tile, sequence, query head); fully visible key tiles run unmasked, the diagonal
tiles masked. The first query head of each KV group also stores its tile's K/V rows into the cache,
so every token is written exactly once in the same launch. File order: kernel, launcher
`prefill_attention_triton`, then the references (`prefill_attention_reference` is the CPU path
and the test oracle).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the references below are the whole implementation
    triton = None

_LOG2E = 1.4426950408889634


if triton is not None:

    @triton.jit
    def _online_softmax_step(qk, v, m_i, l_i, acc):
        """Folds one K/V tile into the running softmax (base 2): qk [BM, BN] scaled scores, v [BN, D]."""
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old maximum
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _prefill_kernel(
        q_ptr,  # [T, Hq, D]
        k_ptr,  # [T, Hkv, D]
        v_ptr,  # [T, Hkv, D]
        out_ptr,  # [T, Hq, D]
        cu_seqlens_ptr,  # [B + 1] int32
        k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
        v_cache_ptr,  # same layout and strides as k_cache
        block_tables_ptr,  # [B, max_blocks] int32
        qk_scale,  # sm_scale * log2(e)
        stride_qt, stride_qh,
        stride_kt, stride_kh,
        stride_vt, stride_vh,
        stride_ot, stride_oh,
        stride_cache_block, stride_cache_slot, stride_cache_head,
        stride_table,
        block_size,
        group,  # query heads per KV head
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,  # divides BLOCK_M
    ):  # fmt: skip
        tile, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        seq_start = tl.load(cu_seqlens_ptr + seq)
        seq_len = tl.load(cu_seqlens_ptr + seq + 1) - seq_start
        tile_start = tile * BLOCK_M
        if tile_start < seq_len:
            kv_head = head // group
            offs_m = tile_start + tl.arange(0, BLOCK_M)  # positions in the sequence
            offs_d = tl.arange(0, HEAD_DIM)
            m_ok = offs_m < seq_len
            tokens_m = (seq_start + offs_m).to(tl.int64)
            q = tl.load(
                q_ptr + tokens_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_ok[:, None],
                other=0.0,
            )  # [BM, D]

            if head % group == 0:  # this tile's K/V rows into the paged cache, once per KV head
                kv_mask = m_ok[:, None]
                k_rows = tl.load(
                    k_ptr + tokens_m[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kv_mask
                )
                v_rows = tl.load(
                    v_ptr + tokens_m[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=kv_mask
                )
                blocks = tl.load(block_tables_ptr + seq * stride_table + offs_m // block_size, mask=m_ok, other=0)
                slots = (
                    blocks.to(tl.int64) * stride_cache_block
                    + (offs_m % block_size) * stride_cache_slot
                    + kv_head * stride_cache_head
                )
                cache_offs = slots[:, None] + offs_d[None, :]
                tl.store(k_cache_ptr + cache_offs, k_rows.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
                tl.store(v_cache_ptr + cache_offs, v_rows.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)

            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
            offs_n0 = tl.arange(0, BLOCK_N)
            kv_base = seq_start.to(tl.int64)
            # Key tiles wholly before this query tile: visible to every row, no mask.
            for start_n in range(0, tile_start, BLOCK_N):
                tokens_n = kv_base + start_n + offs_n0
                k = tl.load(k_ptr + tokens_n[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :])
                v = tl.load(v_ptr + tokens_n[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :])
                qk = tl.dot(q, tl.trans(k)) * qk_scale  # [BM, BN]
                m_i, l_i, acc = _online_softmax_step(qk, v, m_i, l_i, acc)
            # Diagonal tiles: causal and length masks.
            for start_n in range(tile_start, tl.minimum(tile_start + BLOCK_M, seq_len), BLOCK_N):
                offs_n = start_n + offs_n0
                n_ok = offs_n < seq_len
                tokens_n = kv_base + offs_n
                k = tl.load(
                    k_ptr + tokens_n[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                    mask=n_ok[:, None],
                    other=0.0,
                )
                v = tl.load(
                    v_ptr + tokens_n[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=n_ok[:, None],
                    other=0.0,
                )
                qk = tl.dot(q, tl.trans(k)) * qk_scale
                visible = (offs_m[:, None] >= offs_n[None, :]) & n_ok[None, :]
                qk = tl.where(visible, qk, float("-inf"))
                m_i, l_i, acc = _online_softmax_step(qk, v, m_i, l_i, acc)
            out = acc / l_i[:, None]
            tl.store(
                out_ptr + tokens_m[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=m_ok[:, None],
            )


@dataclass(frozen=True)
class PrefillConfig:
    """Tile shape of one `_prefill_kernel` launch (CUDA configs are compiled ahead of time by kernels.aot)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Triton tutorial's FA-2 settings for Hopper; untuned on this project's hardware (bench/bench_kernels.py).
CUDA_PREFILL_CONFIGS = {
    64: PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3),
    128: PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
}
# Interpreter: small tiles so that short test sequences still cross tile boundaries.
CPU_PREFILL_CONFIG = PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)


def prefill_attention_triton(
    q: torch.Tensor,  # [T, q_heads, D]
    k: torch.Tensor,  # [T, kv_heads, D]
    v: torch.Tensor,  # [T, kv_heads, D]
    cu_seqlens: torch.Tensor,  # [B + 1] int32
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    sm_scale: float,
    *,
    max_seqlen: int | None = None,  # longest sequence; computed (a device sync) when None
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """One-launch causal varlen attention; same contract as `prefill_attention_reference`."""
    if triton is None:
        raise RuntimeError("prefill_attention_triton needs triton")
    total, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if q_heads % kv_heads or head_dim not in (16, 32, 64, 128, 256) or (q.is_cuda and head_dim not in (64, 128)):
        raise ValueError(f"unsupported heads/head_dim: {q_heads=} {kv_heads=} {head_dim=}")
    if q.is_cuda and q.dtype not in (torch.bfloat16, torch.float16):  # fp32 tiles outgrow shared memory
        raise ValueError(f"prefill_attention_triton runs bf16/fp16 on CUDA, not {q.dtype}")
    if k_cache.shape[2:] != (kv_heads, head_dim) or k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError("k_cache/v_cache must be [num_blocks, block_size, kv_heads, D] with equal strides, unit in D")
    if not q.is_cuda and torch.bfloat16 in (q.dtype, k_cache.dtype):
        # The interpreter cannot do bf16 arithmetic: run in fp32 and write back.
        k32, v32 = k_cache.float(), v_cache.float()
        out = prefill_attention_triton(
            q.float(),
            k.float(),
            v.float(),
            cu_seqlens,
            k32,
            v32,
            block_tables,
            sm_scale,
            max_seqlen=max_seqlen,
            config=config,
        )
        k_cache.copy_(k32)
        v_cache.copy_(v32)
        return out.to(q.dtype)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    batch = cu_seqlens.shape[0] - 1
    if total == 0 or batch == 0:
        return out
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    config = config or (CUDA_PREFILL_CONFIGS[head_dim] if q.is_cuda else CPU_PREFILL_CONFIG)
    cu_seqlens = cu_seqlens.to(torch.int32)
    block_tables = block_tables.to(torch.int32)
    grid = (triton.cdiv(max_seqlen, config.block_m), batch, q_heads)
    _prefill_kernel[grid](
        q, k, v, out, cu_seqlens, k_cache, v_cache, block_tables, sm_scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        k_cache.shape[1], q_heads // kv_heads,
        HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


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
    seq_ids = torch.repeat_interleave(
        torch.arange(len(lengths), device=cu_seqlens.device), torch.tensor(lengths, device=cu_seqlens.device)
    )
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
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        # [1, H, L, D] per sequence; SDPA's fp32 CPU kernel, GQA without repeating K/V.
        qs, ks, vs = (t[start:end].float().transpose(0, 1)[None] for t in (q, k, v))
        attended = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=sm_scale, enable_gqa=True)
        out[start:end] = attended[0].transpose(0, 1).to(q.dtype)
    return out

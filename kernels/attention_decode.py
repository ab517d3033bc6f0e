"""Decode attention: one query token per sequence against the paged KV cache.

Cache layout as in attention_prefill. The Triton kernel packs the query heads that share a KV head
into the M dimension of one tile (BLOCK_H rows), so each KV tile is read once per KV head; each
program covers one split of the context (flash-decoding), and a merge kernel combines the splits'
partial outputs by their log-sum-exp. With one split the first kernel writes the output directly.
File order: kernels, launcher `decode_attention_triton`, then `decode_attention_reference`, the
CPU path and the test oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.attention_prefill import prefill_attention_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference below is the whole implementation
    triton = None

_LOG2E = 1.4426950408889634


if triton is not None:

    @triton.jit
    def _decode_split_kernel(
        q_ptr,  # [B, Hq, D]
        k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
        v_cache_ptr,  # same layout and strides as k_cache
        block_tables_ptr,  # [B, max_blocks] int32
        seq_lens_ptr,  # [B] int32
        out_ptr,  # [B, Hq, D], written when not SPLIT
        part_out_ptr,  # [B, Hq, num_splits, D] fp32, written when SPLIT
        part_lse_ptr,  # [B, Hq, num_splits] fp32 (log2 units), written when SPLIT
        qk_scale,  # sm_scale * log2(e)
        stride_qb, stride_qh,
        stride_ob, stride_oh,
        stride_cache_block, stride_cache_slot, stride_cache_head,
        stride_table,
        block_size,
        group,  # query heads per KV head (<= BLOCK_H)
        q_heads,
        split_len,  # context tokens per split, a multiple of BLOCK_N
        num_splits,
        HEAD_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr,
    ):  # fmt: skip
        seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + seq)
        offs_h = tl.arange(0, BLOCK_H)
        h_ok = offs_h < group
        heads = kv_head * group + offs_h  # [BH] query heads of this KV head
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(
            q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=h_ok[:, None], other=0.0
        )  # [BH, D]
        ctx_start = split * split_len
        ctx_end = tl.minimum(ctx_start + split_len, seq_len)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
        table = block_tables_ptr + seq * stride_table
        for start_n in range(ctx_start, ctx_end, BLOCK_N):
            pos = start_n + tl.arange(0, BLOCK_N)
            n_ok = pos < ctx_end
            blocks = tl.load(table + pos // block_size, mask=n_ok, other=0).to(tl.int64)
            slots = blocks * stride_cache_block + (pos % block_size) * stride_cache_slot + kv_head * stride_cache_head
            kv_offs = slots[:, None] + offs_d[None, :]  # [BN, D]
            k = tl.load(k_cache_ptr + kv_offs, mask=n_ok[:, None], other=0.0)
            v = tl.load(v_cache_ptr + kv_offs, mask=n_ok[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k)) * qk_scale  # [BH, BN]
            qk = tl.where(n_ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if SPLIT:
            # An empty split (past the sequence's end) leaves l_i = 0: output 0 with weight exp2(-inf) = 0.
            nonempty = l_i > 0.0
            part = tl.where(nonempty[:, None], acc / tl.where(nonempty, l_i, 1.0)[:, None], 0.0)
            lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
            row = (seq * q_heads + heads) * num_splits + split  # [BH]
            tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], part, mask=h_ok[:, None])
            tl.store(part_lse_ptr + row, lse, mask=h_ok)
        else:
            out = acc / l_i[:, None]
            tl.store(
                out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=h_ok[:, None],
            )

    @triton.jit
    def _decode_merge_kernel(
        part_out_ptr,  # [B, Hq, num_splits, D] fp32
        part_lse_ptr,  # [B, Hq, num_splits] fp32 (log2 units)
        out_ptr,  # [B, Hq, D]
        stride_ob, stride_oh,
        q_heads,
        num_splits,
        HEAD_DIM: tl.constexpr,
        BLOCK_S: tl.constexpr,  # >= num_splits
    ):  # fmt: skip
        seq, head = tl.program_id(0), tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, HEAD_DIM)
        s_ok = offs_s < num_splits
        row = (seq * q_heads + head) * num_splits + offs_s  # [BS]
        lse = tl.load(part_lse_ptr + row, mask=s_ok, other=float("-inf"))
        weight = tl.exp2(lse - tl.max(lse, axis=0))
        weight = weight / tl.sum(weight, axis=0)
        part = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        out = tl.sum(weight[:, None] * part, axis=0)  # [D]
        tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True)
class DecodeConfig:
    """Tile shape of the decode kernels (CUDA configs are compiled ahead of time by kernels.aot)."""

    block_h: int  # query heads per tile, >= the GQA group and >= 16 (tl.dot's minimum M)
    block_n: int  # context tokens per tile
    num_warps: int
    num_stages: int


CUDA_DECODE_CONFIG = DecodeConfig(block_h=16, block_n=64, num_warps=4, num_stages=2)
CPU_DECODE_CONFIG = DecodeConfig(block_h=16, block_n=16, num_warps=4, num_stages=1)
MAX_SPLITS = 64  # BLOCK_S of the merge kernel
_MIN_SPLIT_TOKENS = 256  # no split shorter than this: the merge would cost more than it saves
_TARGET_PROGRAMS = 2 * 132  # two programs per H200 SM


def choose_num_splits(batch: int, kv_heads: int, max_seq_len: int) -> int:
    """Splits per sequence so that batch * kv_heads * splits reaches ~2 programs per SM, without short splits."""
    programs = batch * kv_heads
    if programs >= _TARGET_PROGRAMS:
        return 1
    wanted = triton.cdiv(_TARGET_PROGRAMS, programs)
    return max(1, min(wanted, triton.cdiv(max_seq_len, _MIN_SPLIT_TOKENS), MAX_SPLITS))


def decode_attention_triton(
    q: torch.Tensor,  # [B, q_heads, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, >= 1
    sm_scale: float,
    *,
    max_seq_len: int | None = None,  # longest seq_lens entry; computed (a device sync) when None
    num_splits: int | None = None,  # split-K factor; chosen by `choose_num_splits` when None
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """GQA-packed split-K paged decode; same contract as `decode_attention_reference`."""
    if triton is None:
        raise RuntimeError("decode_attention_triton needs triton")
    batch, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if (q_heads % kv_heads or k_cache.shape[3] != head_dim or k_cache.stride() != v_cache.stride()
            or k_cache.stride(3) != 1):  # the kernel steps through D in units
        raise ValueError("q [B, Hq, D] and caches [num_blocks, block_size, Hkv, D] with equal strides, unit in D, "
                         "expected")
    if not q.is_cuda and torch.bfloat16 in (q.dtype, k_cache.dtype):  # no bf16 arithmetic in the interpreter
        out = decode_attention_triton(
            q.float(),
            k_cache.float(),
            v_cache.float(),
            block_tables,
            seq_lens,
            sm_scale,
            max_seq_len=max_seq_len,
            num_splits=num_splits,
            config=config,
        )
        return out.to(q.dtype)
    group = q_heads // kv_heads
    config = config or (CUDA_DECODE_CONFIG if q.is_cuda else CPU_DECODE_CONFIG)
    if group > config.block_h:
        config = DecodeConfig(triton.next_power_of_2(group), config.block_n, config.num_warps, config.num_stages)
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    if batch == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    if num_splits is None:
        num_splits = choose_num_splits(batch, kv_heads, max_seq_len)
    num_splits = max(1, min(num_splits, MAX_SPLITS))
    split_len = triton.cdiv(triton.cdiv(max_seq_len, num_splits), config.block_n) * config.block_n
    num_splits = triton.cdiv(max_seq_len, split_len)
    split = num_splits > 1
    part_out = torch.empty(batch, q_heads, num_splits if split else 0, head_dim, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(batch, q_heads, num_splits if split else 0, device=q.device, dtype=torch.float32)
    block_tables = block_tables.to(torch.int32)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens.to(torch.int32), out, part_out, part_lse, sm_scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        k_cache.shape[1], group, q_heads, split_len, num_splits,
        HEAD_DIM=head_dim, BLOCK_H=config.block_h, BLOCK_N=config.block_n, SPLIT=split,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if split:
        _decode_merge_kernel[(batch, q_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1), q_heads, num_splits,
            HEAD_DIM=head_dim, BLOCK_S=MAX_SPLITS, num_warps=4,
        )  # fmt: skip
    return out


def decode_attention_reference(
    q: torch.Tensor,  # [B, q_heads, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, tokens in the cache for each sequence (incl. the current one)
    sm_scale: float,
    *,
    shared_blocks: int = 0,  # the first shared_blocks entries are the same cached blocks in every row
) -> torch.Tensor:
    """Returns out [B, q_heads, D] in q's dtype (fp32 softmax and accumulation): a prefill of one new token
    per sequence, the current one (prefill_attention_reference, cascade over a shared prefix included)."""
    cu_seqlens = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return prefill_attention_reference(q, k_cache, v_cache, cu_seqlens, seq_lens, block_tables, sm_scale,
                                       shared_blocks=shared_blocks)

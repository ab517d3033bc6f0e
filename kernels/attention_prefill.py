"""Causal prefill attention of packed new tokens against the paged KV cache (prefix caching, chunked prefill).

Paged cache layout (vLLM's): k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim];
token t of sequence s lives in block block_tables[s, t // block_size] at slot t % block_size.
The new tokens' K/V are written into the cache beforehand (`write_kv_reference`, torch indexing);
attention reads keys and values only from the cache. Sequence s holds seq_lens[s] tokens, the last
n_s of them new: context c_s = seq_lens[s] - n_s tokens (a prefix-cache hit or earlier chunks) and
new token i at position c_s + i, which attends to every position <= its own.

The Triton kernel is a FlashAttention-2 forward (online softmax in exp2, fp32 accumulators): one
program per (query tile, sequence, query head), K/V tiles gathered through the block table one
position at a time; key tiles wholly before the tile's first query position run unmasked, the
diagonal tiles masked. File order: kernel, launcher `prefill_attention_triton`, then the references
(`prefill_attention_reference` is the CPU path and the test oracle).
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
        q_ptr,  # [T, Hq, D], the new tokens packed
        k_cache_ptr,  # [num_blocks, block_size, Hkv, D], new tokens included
        v_cache_ptr,  # same layout and strides as k_cache
        cu_seqlens_ptr,  # [B + 1] int32, offsets of each sequence's new tokens in q
        seq_lens_ptr,  # [B] int32, cached tokens per sequence (context + new)
        block_tables_ptr,  # [B, max_blocks] int32
        out_ptr,  # [T, Hq, D]
        qk_scale,  # sm_scale * log2(e)
        stride_qt, stride_qh,
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
        q_start = tl.load(cu_seqlens_ptr + seq)
        q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start  # new tokens; 0 skips the sequence
        seq_len = tl.load(seq_lens_ptr + seq)
        context = seq_len - q_len
        tile_start = tile * BLOCK_M
        if tile_start < q_len:
            kv_head = head // group
            offs_m = tile_start + tl.arange(0, BLOCK_M)  # indices among the new tokens
            offs_d = tl.arange(0, HEAD_DIM)
            m_ok = offs_m < q_len
            tokens_m = (q_start + offs_m).to(tl.int64)
            q = tl.load(
                q_ptr + tokens_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_ok[:, None],
                other=0.0,
            )  # [BM, D]
            pos_m = context + offs_m  # [BM] positions in the sequence

            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
            offs_n0 = tl.arange(0, BLOCK_N)
            table = block_tables_ptr + seq * stride_table
            head_off = kv_head * stride_cache_head
            # Key tiles wholly before the tile's first query position context + tile_start (so also
            # before seq_len): visible to every row, no mask.
            full_end = (context + tile_start) // BLOCK_N * BLOCK_N
            for start_n in range(0, full_end, BLOCK_N):
                pos_n = start_n + offs_n0
                blocks = tl.load(table + pos_n // block_size).to(tl.int64)
                slots = blocks * stride_cache_block + (pos_n % block_size) * stride_cache_slot + head_off
                kv_offs = slots[:, None] + offs_d[None, :]  # [BN, D]
                k = tl.load(k_cache_ptr + kv_offs)
                v = tl.load(v_cache_ptr + kv_offs)
                qk = tl.dot(q, tl.trans(k)) * qk_scale  # [BM, BN]
                m_i, l_i, acc = _online_softmax_step(qk, v, m_i, l_i, acc)
            # Diagonal tiles, up to the tile's last query position: causal and length masks. Every row
            # sees key full_end (<= its position) in the first of them, so no row stays at -inf.
            diag_end = context + tl.minimum(tile_start + BLOCK_M, q_len)
            for start_n in range(full_end, diag_end, BLOCK_N):
                pos_n = start_n + offs_n0
                n_ok = pos_n < seq_len
                blocks = tl.load(table + pos_n // block_size, mask=n_ok, other=0).to(tl.int64)
                slots = blocks * stride_cache_block + (pos_n % block_size) * stride_cache_slot + head_off
                kv_offs = slots[:, None] + offs_d[None, :]
                k = tl.load(k_cache_ptr + kv_offs, mask=n_ok[:, None], other=0.0)
                v = tl.load(v_cache_ptr + kv_offs, mask=n_ok[:, None], other=0.0)
                qk = tl.dot(q, tl.trans(k)) * qk_scale
                visible = (pos_m[:, None] >= pos_n[None, :]) & n_ok[None, :]
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
    q: torch.Tensor,  # [T, q_heads, D], T = new tokens of all sequences, packed
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D], already holding the new tokens' K
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D]
    cu_seqlens: torch.Tensor,  # [B + 1] int32, start of each sequence's new tokens in the packing
    seq_lens: torch.Tensor,  # [B] int32, tokens in the cache per sequence: cached prefix + new tokens
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    sm_scale: float,
    *,
    max_seqlen_q: int | None = None,  # most new tokens of one sequence; computed (a device sync) when None
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """One-launch causal varlen attention over the paged cache; same contract as `prefill_attention_reference`."""
    if triton is None:
        raise RuntimeError("prefill_attention_triton needs triton")
    total, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if q_heads % kv_heads or head_dim not in (16, 32, 64, 128, 256) or (q.is_cuda and head_dim not in (64, 128)):
        raise ValueError(f"unsupported heads/head_dim: {q_heads=} {kv_heads=} {head_dim=}")
    if q.is_cuda and q.dtype not in (torch.bfloat16, torch.float16):  # fp32 tiles outgrow shared memory
        raise ValueError(f"prefill_attention_triton runs bf16/fp16 on CUDA, not {q.dtype}")
    if (k_cache.dim() != 4 or k_cache.shape[3] != head_dim or v_cache.shape != k_cache.shape
            or k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1):  # the kernel steps through D in units
        raise ValueError("k_cache/v_cache must be [num_blocks, block_size, kv_heads, D] with equal strides, unit in D")
    batch = seq_lens.shape[0]
    if cu_seqlens.shape != (batch + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"cu_seqlens [B + 1], seq_lens [B], block_tables [B, max_blocks] expected, got "
                         f"{tuple(cu_seqlens.shape)}, {tuple(seq_lens.shape)}, {tuple(block_tables.shape)}")
    if not q.is_cuda and torch.bfloat16 in (q.dtype, k_cache.dtype):
        # The interpreter cannot do bf16 arithmetic: run on fp32 copies (the kernel only reads the cache).
        out = prefill_attention_triton(
            q.float(),
            k_cache.float(),
            v_cache.float(),
            cu_seqlens,
            seq_lens,
            block_tables,
            sm_scale,
            max_seqlen_q=max_seqlen_q,
            config=config,
        )
        return out.to(q.dtype)
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    if total == 0 or batch == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    config = config or (CUDA_PREFILL_CONFIGS[head_dim] if q.is_cuda else CPU_PREFILL_CONFIG)
    cu_seqlens, seq_lens, block_tables = (t.to(torch.int32) for t in (cu_seqlens, seq_lens, block_tables))
    grid = (triton.cdiv(max_seqlen_q, config.block_m), batch, q_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, cu_seqlens, seq_lens, block_tables, out, sm_scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
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


def heads_first(cache: torch.Tensor) -> torch.Tensor:
    """The cache [num_blocks, block_size, kv_heads, D] viewed as [kv_heads, num_blocks, block_size, D].

    A view either way; when the storage itself is head-major (workers.runtime.kv_cache allocates it so),
    gathering a sequence's blocks from this view copies whole [block_size, D] runs and yields K/V
    already laid out [kv_heads, tokens, D] for a matmul, with no second copy.
    """
    return cache.permute(2, 0, 1, 3)


def prefill_attention_reference(
    q: torch.Tensor,  # [T, q_heads, D], T = new tokens of all sequences, packed
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D], already holding the new tokens' K
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D]
    cu_seqlens: torch.Tensor,  # [B + 1] int32, start of each sequence's new tokens in the packing
    seq_lens: torch.Tensor,  # [B] int32, tokens in the cache per sequence: cached prefix + new tokens
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    sm_scale: float,
) -> torch.Tensor:
    """Returns out [T, q_heads, D] (q's dtype); softmax in fp32.

    Sequence s has seq_lens[s] - n_s tokens already cached (a prefix-cache hit or an earlier chunk)
    and n_s new ones; new token i sits at position seq_lens[s] - n_s + i and attends to every cached
    position up to its own (causal, bottom-right aligned).
    """
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    bounds, lengths = cu_seqlens.tolist(), seq_lens.tolist()
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if end == start:
            continue
        total, new = lengths[s], end - start
        blocks = block_tables[s, : -(-total // block_size)].to(torch.int64)
        # [1, Hkv, L, D]: this sequence's keys/values gathered block by block (one copy, contiguous when
        # the cache is stored head-major, see heads_first), then cut to its length.
        ks, vs = (heads_first(c)[:, blocks].flatten(1, 2)[None, :, :total].float() for c in (k_cache, v_cache))
        qs = q[start:end].float().transpose(0, 1)[None]
        if total == new:  # no cached prefix: plain causal
            attended = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=sm_scale, enable_gqa=True)
        else:
            visible = torch.arange(total, device=q.device)[None, :] <= torch.arange(total - new, total,
                                                                                     device=q.device)[:, None]
            attended = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=visible, scale=sm_scale, enable_gqa=True)
        out[start:end] = attended[0].transpose(0, 1).to(q.dtype)
    return out

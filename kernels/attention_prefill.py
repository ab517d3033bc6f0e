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

import math
import threading
from dataclasses import dataclass

import torch

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


_scratch = threading.local()  # per thread: one engine's step never races another's buffers


def _reused(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A tensor of `shape` backed by this thread's buffer `name`, grown as needed and reused across calls.

    The CPU references gather every layer's K/V of a step into same-sized tensors; a fresh allocation
    of that size each time costs page faults (measured: a 17 MB gather 5.6 ms fresh, 0.7 ms reused).
    """
    buffers = _scratch.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    buf = buffers.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
        buf = buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel].view(shape)


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, scratch: str | None = None) -> torch.Tensor:
    """The listed blocks of a cache [num_blocks, block_size, kv_heads, D], in order: [len(blocks) * block_size,
    kv_heads, D]. One index_select of whole blocks (contiguous runs), far faster on CPU than indexing
    by token; into the reused buffer `scratch` when given (valid until the next gather into it). A cache
    that is not contiguous (a test's strided view) is gathered by indexing."""
    if not cache.is_contiguous():
        return cache[blocks].flatten(0, 1)
    rows = cache.flatten(1)
    out = None if scratch is None else _reused(scratch, (blocks.numel(), rows.shape[1]), cache)
    return torch.index_select(rows, 0, blocks, out=out).view(-1, *cache.shape[2:])


def attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                    mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [N, H, M, D] in q's dtype, logsumexp [N, H, M] fp32) of softmax(q k^T * scale) v, q/k/v [N, H, ., D].

    mask: bool [N, 1, M, L] or broadcastable, True where a key is visible. On CPU this is torch's fused
    flash kernel (fp32 accumulation in any dtype, strided inputs, and the log-sum-exp that lets two
    partial attentions be merged); elsewhere the same maths in fp32.
    """
    if q.device.type == "cpu":
        bias = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
        if bias is not None and bias.shape[-2] != q.shape[-2]:  # the kernel wants one row per query
            bias = bias.expand(*bias.shape[:-2], q.shape[-2], bias.shape[-1])
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.exp(scores - lse[..., None]) @ v.float()).to(q.dtype), lse


def prefill_attention_reference(
    q: torch.Tensor,  # [T, q_heads, D], T = new tokens of all sequences, packed
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D], already holding the new tokens' K
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D]
    cu_seqlens: torch.Tensor,  # [B + 1] int32, start of each sequence's new tokens in the packing
    seq_lens: torch.Tensor,  # [B] int32, tokens in the cache per sequence: cached prefix + new tokens
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    sm_scale: float,
    *,
    shared_blocks: int = 0,  # the first shared_blocks entries are the same cached blocks in every row
) -> torch.Tensor:
    """Returns out [T, q_heads, D] in q's dtype (fp32 softmax and accumulation).

    Sequence s has seq_lens[s] - n_s tokens already cached (a prefix-cache hit or an earlier chunk)
    and n_s new ones; new token i sits at position seq_lens[s] - n_s + i and attends to every cached
    position up to its own (causal, bottom-right aligned).

    All sequences in two fused attention calls (cascade attention): the shared prefix's keys, gathered
    once, against every new token of every sequence (all of them come after it: no mask); then each
    sequence's own blocks, gathered and padded to the longest, against its own new tokens (causal mask).
    The query heads of a KV head stack into one query block ([group * n, D], GQA without repeating
    K/V). The two partial results merge by their log-sum-exp into exact attention over the context.
    """
    total_tokens, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = q_heads // kv_heads
    bounds, totals = cu_seqlens.tolist(), seq_lens.tolist()
    rows = [s for s in range(len(totals)) if bounds[s + 1] > bounds[s]]
    out = torch.empty_like(q)
    if not rows:
        return out
    dev = q.device
    new = [bounds[s + 1] - bounds[s] for s in rows]
    n_max, num_rows = max(new), len(rows)
    # Padded queries [R, Hkv, group * n_max, D]: slot i of row r is packed token bounds[s] + i, or a zero
    # row past the row's end (its output is dropped; it sits at the row's last position, never masked out).
    one_each = n_max == 1 and num_rows == total_tokens  # decode: token r is row r, nothing to pad
    if one_each:
        padded = q.view(num_rows, kv_heads, group, head_dim)
    else:
        slot = [[bounds[s] + min(i, n - 1) for i in range(n_max)] for s, n in zip(rows, new, strict=True)]
        index = torch.tensor(slot, device=dev)  # [R, n_max]
        padded = q[index].view(num_rows, n_max, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
        padded = padded.reshape(num_rows, kv_heads, group * n_max, head_dim)
    parts = []
    if shared_blocks:
        blocks = block_tables[rows[0], :shared_blocks].to(torch.int64)
        keys, values = (gather_blocks(c, blocks, name).transpose(0, 1)[None]
                        for c, name in ((k_cache, "shared_k"), (v_cache, "shared_v")))  # [1, Hkv, P, D]
        every = padded.transpose(0, 1).reshape(1, kv_heads, num_rows * group * n_max, head_dim)
        part, lse = attend_with_lse(every, keys, values, scale=sm_scale)
        parts.append((part.view(kv_heads, num_rows, group * n_max, head_dim).transpose(0, 1),
                      lse.view(kv_heads, num_rows, group * n_max).transpose(0, 1)))
    if one_each and num_rows >= 4 * _MIN_BUCKET:
        # Decode rows differ in length; padding all to the longest wastes work: attend in length buckets.
        order = sorted(range(num_rows), key=lambda r: totals[rows[r]])
        buckets = [order[i * num_rows // _BUCKETS:(i + 1) * num_rows // _BUCKETS] for i in range(_BUCKETS)]
        own_out = torch.empty(num_rows, kv_heads, group, head_dim, dtype=q.dtype, device=dev)
        own_lse = torch.empty(num_rows, kv_heads, group, dtype=torch.float32, device=dev)
        for bucket in buckets:
            picked = torch.tensor(bucket, device=dev)
            part, lse = _attend_own(padded[picked], [rows[r] for r in bucket], [1] * len(bucket), k_cache, v_cache,
                                    block_tables, totals, shared_blocks, sm_scale, one_each=True)
            own_out[picked], own_lse[picked] = part, lse
        parts.append((own_out, own_lse))
    else:
        parts.append(_attend_own(padded, rows, new, k_cache, v_cache, block_tables, totals, shared_blocks, sm_scale,
                                 one_each=one_each))
    merged = merge_attention(parts)  # [R, Hkv, group * n_max, D]
    if one_each:
        return merged.reshape(num_rows, q_heads, head_dim).to(q.dtype)
    merged = merged.view(num_rows, kv_heads, group, n_max, head_dim).permute(0, 3, 1, 2, 4)
    merged = merged.reshape(num_rows, n_max, q_heads, head_dim)
    keep = torch.tensor([[i < n for i in range(n_max)] for n in new], device=dev)
    out[index[keep]] = merged[keep].to(q.dtype)
    return out


_BUCKETS = 4  # length buckets of a large decode batch
_MIN_BUCKET = 16  # rows per bucket, at least


def _attend_own(padded: torch.Tensor, rows: list[int], new: list[int], k_cache: torch.Tensor, v_cache: torch.Tensor,
                block_tables: torch.Tensor, totals: list[int], shared_blocks: int, sm_scale: float, *,
                one_each: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of padded queries [R, Hkv, group * n_max, D] against each row's blocks after the shared ones,
    padded to the longest of these rows, causally masked (one_each: one new token per row, length mask)."""
    num_rows, kv_heads, _, head_dim = padded.shape
    block_size = k_cache.shape[1]
    n_max = max(new)
    group = padded.shape[2] // n_max
    dev = padded.device
    shared_len = shared_blocks * block_size
    own_blocks = -(-(max(totals[s] for s in rows) - shared_len) // block_size)
    table = block_tables[rows][:, shared_blocks:shared_blocks + own_blocks].to(torch.int64)
    own = own_blocks * block_size
    keys, values = (gather_blocks(c, table.flatten(), name).view(num_rows, own, kv_heads, head_dim).transpose(1, 2)
                    for c, name in ((k_cache, "own_k"), (v_cache, "own_v")))  # [R, Hkv, own, D]
    key_pos = torch.arange(shared_len, shared_len + own, device=dev)
    if one_each:  # the current token sees every cached position: only the row's length masks
        lengths = torch.tensor([totals[s] for s in rows], device=dev)
        visible = (key_pos[None, :] < lengths[:, None])[:, None, None, :]  # [R, 1, 1, own]
    else:
        query_pos = torch.tensor([[totals[s] - n + min(i, n - 1) for i in range(n_max)]
                                  for s, n in zip(rows, new, strict=True)], device=dev)  # [R, n_max]
        visible = key_pos[None, None, :] <= query_pos[:, :, None]  # [R, n_max, own]; implies key_pos < seq_len
        visible = visible[:, None].expand(num_rows, group, n_max, own).reshape(num_rows, 1, group * n_max, own)
    return attend_with_lse(padded, keys, values, scale=sm_scale, mask=visible)


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One attention result from partial ones over disjoint key sets, (out [..., M, D], lse [..., M]) each."""
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.logsumexp(torch.stack([p_lse for _, p_lse in parts]), dim=0)
    return sum(p_out.float() * torch.exp(p_lse - lse)[..., None] for p_out, p_lse in parts)

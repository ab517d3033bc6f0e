"""The one place that chooses between Triton kernels (CUDA) and torch references (everything else).

GENQ_KERNELS=reference forces the torch references everywhere (A/B checks); GENQ_KERNELS=interpret
also runs the Triton launchers on CPU tensors, which needs TRITON_INTERPRET=1 set before triton is
first imported (tests only: the interpreter is slow). Without triton installed, everything runs the
references.
"""

from __future__ import annotations

import os

import torch

from kernels.attention_decode import decode_attention_reference, decode_attention_triton
from kernels.attention_prefill import prefill_attention_reference, prefill_attention_triton, write_kv_reference
from kernels.sampling import SamplingMetadata, sample_reference, sample_triton
from kernels.sampling import triton as _triton

# Head dims and (on CUDA) dtypes the attention kernels are built and compiled ahead of time for; others
# run the reference. fp32 is left out: the prefill tiles at head_dim 128 would need 256 KiB of shared
# memory (sm_90 has 227), and tl.dot would round fp32 inputs to tf32.
TRITON_HEAD_DIMS = (64, 128)
TRITON_ATTENTION_DTYPES = (torch.bfloat16, torch.float16)


def use_triton(t: torch.Tensor) -> bool:
    """Triton on CUDA tensors (and on CPU under GENQ_KERNELS=interpret), unless GENQ_KERNELS=reference."""
    mode = os.environ.get("GENQ_KERNELS", "triton")
    if _triton is None or mode == "reference":
        return False
    return t.is_cuda or mode == "interpret"


def use_triton_attention(q: torch.Tensor) -> bool:
    """use_triton for attention on q [..., H, D]: a built head dim and, on CUDA, a built dtype (the CPU
    interpreter runs any float dtype, bf16 upcast)."""
    return use_triton(q) and q.shape[-1] in TRITON_HEAD_DIMS and (q.dtype in TRITON_ATTENTION_DTYPES or not q.is_cuda)


def sample(logits: torch.Tensor, meta: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] -> (tokens [B] int64, logprobs [B] float32 or None)."""
    if use_triton(logits):
        return sample_triton(logits, meta)
    return sample_reference(logits, meta)


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens: torch.Tensor, seq_lens: torch.Tensor,
    block_tables: torch.Tensor, sm_scale: float, *, max_seqlen_q: int | None = None, shared_blocks: int = 0,
) -> torch.Tensor:
    """Causal attention of packed new tokens q [T, Hq, D] -> out [T, Hq, D] against the paged cache.

    The new tokens' K/V must already be in the cache (write_kv). Sequence s has seq_lens[s] tokens
    cached in all, the last cu_seqlens[s+1] - cu_seqlens[s] of them new; the others are a cached prefix
    (a prefix-cache hit or an earlier chunk of a chunked prefill). max_seqlen_q (most new tokens of one
    sequence), when given, saves the Triton path a device sync. shared_blocks: as for decode_attention
    (blocks every row holds before its new tokens).
    """
    if use_triton_attention(q):
        return prefill_attention_triton(q, k_cache, v_cache, cu_seqlens, seq_lens, block_tables, sm_scale,
                                        max_seqlen_q=max_seqlen_q)
    return prefill_attention_reference(q, k_cache, v_cache, cu_seqlens, seq_lens, block_tables, sm_scale,
                                       shared_blocks=shared_blocks)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, sm_scale: float, *, max_seq_len: int | None = None, shared_blocks: int = 0,
) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D] -> out [B, Hq, D], against the paged cache.

    max_seq_len (largest seq_lens entry), when given, saves the Triton path a device sync.
    shared_blocks (the leading block-table entries every row has in common: a shared prompt prefix)
    lets the reference score those keys once for all rows (cascade); the Triton kernel reads each
    row's table whole and ignores it.
    """
    if use_triton_attention(q):
        return decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, sm_scale, max_seq_len=max_seq_len)
    return decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, sm_scale,
                                      shared_blocks=shared_blocks)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter k, v [T, Hkv, D] into the paged cache at flat slots [T] (torch indexing on every device)."""
    write_kv_reference(k, v, k_cache, v_cache, slot_mapping)

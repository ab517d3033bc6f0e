"""The one place that chooses between Triton kernels (CUDA) and torch references (everything else)."""

from __future__ import annotations

import os

import torch

from kernels.attention_decode import decode_attention_reference
from kernels.attention_prefill import prefill_attention_reference, write_kv_reference
from kernels.sampling import SamplingMetadata, sample_reference


def use_triton(t: torch.Tensor) -> bool:
    """Triton on CUDA tensors, unless GENQ_KERNELS=reference forces the torch path (for A/B checks)."""
    return t.is_cuda and os.environ.get("GENQ_KERNELS", "triton") != "reference"


def sample(logits: torch.Tensor, meta: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] -> (tokens [B] int64, logprobs [B] float32 or None)."""
    return sample_reference(logits, meta)


def prefill_attention(q, k, v, cu_seqlens, k_cache, v_cache, block_tables, sm_scale: float) -> torch.Tensor:
    """Causal varlen attention, packed q/k/v [T, H, D] -> out [T, Hq, D]; writes k, v into the paged cache."""
    return prefill_attention_reference(q, k, v, cu_seqlens, k_cache, v_cache, block_tables, sm_scale)


def decode_attention(q, k_cache, v_cache, block_tables, seq_lens, sm_scale: float) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D] -> out [B, Hq, D], against the paged cache."""
    return decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, sm_scale)


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Scatter k, v [T, Hkv, D] into the paged cache at flat slots [T]."""
    write_kv_reference(k, v, k_cache, v_cache, slot_mapping)

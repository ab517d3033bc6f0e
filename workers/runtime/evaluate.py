"""Perplexity of a model on token sequences: the yardstick for reduced precision (and, later, for
validation data during fine-tuning).

Teacher-forced: each sequence is one prefill over a scratch paged cache, and every position's logits
score the next token. perplexity = exp(total negative log-likelihood / scored tokens).
"""

from __future__ import annotations

import math

import torch

from workers.runtime.kv_cache import KVCache, blocks_for
from workers.runtime.model import ForwardBatch, Transformer

_BLOCK = 16


@torch.inference_mode()
def perplexity(model: Transformer, sequences: list[list[int]]) -> float:
    """exp(mean NLL) over every next-token prediction of the sequences (each at least 2 tokens)."""
    weight = model.tok_embeddings.weight
    dev = weight.device
    longest = max(len(s) for s in sequences)
    cache = KVCache(model.config, blocks_for(longest, _BLOCK), _BLOCK, dev, weight.dtype)
    nll, count = 0.0, 0
    for seq in sequences:
        n = len(seq)
        batch = ForwardBatch(
            tokens=torch.tensor(seq, device=dev), positions=torch.arange(n, device=dev),
            slot_mapping=torch.arange(n, device=dev),  # blocks 0.. in order: slot == position
            block_tables=torch.arange(blocks_for(n, _BLOCK), dtype=torch.int32, device=dev)[None],
            seq_lens=torch.tensor([n], dtype=torch.int32, device=dev), num_decodes=0,
            cu_seqlens=torch.tensor([0, n], dtype=torch.int32, device=dev), max_prefill_new=n,
        )
        logits = model(batch, cache)[:-1]  # [n - 1, V] fp32: position i predicts token i + 1
        targets = torch.tensor(seq[1:], device=dev)
        nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += n - 1
    return math.exp(nll / count)

"""A dense training forward over the runtime's decoder modules: packed rows, LoRA deltas, autograd.

The runtime's Transformer.forward is inference-only (paged KV cache, inference_mode); this one runs
the same modules and the same maths (RMSNorm, RoPE, GQA, SwiGLU) on a PackedBatch: tokens of several
sequences back to back, positions restarting per sequence, attention causal within each sequence and
never across (block-diagonal causal). The frozen base weights get no gradient; only the adapters do.

Attention runs causal F.scaled_dot_product_attention on each sequence's slice of the packed q/k/v, so
no mask tensor and no padding exist anywhere; every matmul runs on the T real tokens only. The output
head runs at target positions only (target_logprobs), in vocabulary chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.fine_tuning.lora import FusedLora, LoraAdapters
from workers.fine_tuning.packing import PackedBatch
from workers.runtime.model import Attention, FeedForward, Transformer, apply_rope


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch,
                            sm_scale: float) -> torch.Tensor:
    """softmax(q k^T * sm_scale + block-diagonal causal mask) v: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D].

    One causal F.scaled_dot_product_attention per sequence on views of the packed tensors (split's backward
    is one cat, so no padded copy and no zero fill is made either way).
    """
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for qs, ks, vs in zip(q.split(batch.seq_lengths), k.split(batch.seq_lengths), v.split(batch.seq_lengths),
                          strict=True):
        # [1, H, L, D] views: 4-D inputs take the fused (flash) CPU kernel; 3-D ones fall back to bmm + softmax
        out = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                             vs.transpose(0, 1)[None], is_causal=True, scale=sm_scale,
                                             enable_gqa=gqa)  # [1, Hq, L, D]
        outs.append(out[0].transpose(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class _Dropout:
    """PEFT's lora_dropout on the adapters' input, drawn from the trainer's own generator (resumable)."""

    def __init__(self, p: float, generator: torch.Generator | None) -> None:
        self.p = p if generator is not None else 0.0
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return x
        keep = torch.empty(x.shape, dtype=torch.float32).bernoulli_(1.0 - self.p, generator=self.generator)
        return x * (keep.to(device=x.device, dtype=x.dtype) / (1.0 - self.p))


def _linear(module: nn.Linear, x: torch.Tensor, lora: FusedLora | None, scale: float, dropout: _Dropout
            ) -> torch.Tensor:
    out = F.linear(x, module.weight, module.bias)
    return out if lora is None else lora.add_delta(dropout(x), out, scale)


def _attention(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: PackedBatch,
               adapters: LoraAdapters | None, layer: int, dropout: _Dropout) -> torch.Tensor:
    c = attn.config
    tokens = x.shape[0]
    scale = adapters.config.scale if adapters is not None else 0.0
    qkv_lora = adapters.get(layer, "attention.wqkv") if adapters is not None else None
    o_lora = adapters.get(layer, "attention.wo") if adapters is not None else None
    q, k, v = _linear(attn.wqkv, x, qkv_lora, scale, dropout).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
    q = apply_rope(q.view(tokens, c.n_heads, c.head_dim), cos, sin)  # [T, Hq, D]
    k = apply_rope(k.view(tokens, c.n_kv_heads, c.head_dim), cos, sin)  # [T, Hkv, D]
    v = v.reshape(tokens, c.n_kv_heads, c.head_dim)
    out = packed_causal_attention(q, k, v, batch, attn.sm_scale)
    return _linear(attn.wo, out.reshape(tokens, c.q_size), o_lora, scale, dropout)


def _feed_forward(ff: FeedForward, x: torch.Tensor, adapters: LoraAdapters | None, layer: int,
                  dropout: _Dropout) -> torch.Tensor:
    scale = adapters.config.scale if adapters is not None else 0.0
    w13_lora = adapters.get(layer, "feed_forward.w13") if adapters is not None else None
    w2_lora = adapters.get(layer, "feed_forward.w2") if adapters is not None else None
    gate, up = _linear(ff.w13, x, w13_lora, scale, dropout).chunk(2, dim=-1)
    return _linear(ff.w2, F.silu(gate) * up, w2_lora, scale, dropout)


def hidden_states(model: Transformer, batch: PackedBatch, adapters: LoraAdapters | None = None, *,
                  dropout_generator: torch.Generator | None = None) -> torch.Tensor:
    """Final-normed hidden states [T, dim] of a packed row; adapters=None runs the base model.

    Adapter dropout runs only when a dropout_generator is given (training steps).
    """
    dropout = _Dropout(adapters.config.dropout if adapters is not None else 0.0, dropout_generator)
    x = model.tok_embeddings(batch.tokens)  # [T, dim]
    angles = batch.positions.float()[:, None] * model.inv_freq[None, :]  # [T, D/2] fp32
    cos = angles.cos().to(x.dtype)[:, None, :]
    sin = angles.sin().to(x.dtype)[:, None, :]
    for i, layer in enumerate(model.layers):
        x = x + _attention(layer.attention, layer.attention_norm(x), cos, sin, batch, adapters, i, dropout)
        x = x + _feed_forward(layer.feed_forward, layer.ffn_norm(x), adapters, i, dropout)
    return model.norm(x)


VOCAB_CHUNK = 4096  # output-head columns per matmul: a [N, 4096] fp32 chunk of logits stays small


@dataclass
class TargetLogprobs:
    """The model's log-probability of each target token of a packed row."""

    logprobs: torch.Tensor  # [N] fp32: log softmax(logits)[target]; differentiable w.r.t. the hidden states
    correct: torch.Tensor  # [N] bool: the target is the argmax of its logits


class _TargetLogprobsFunction(torch.autograd.Function):
    """log p(target) of hidden rows [N, d] under the output head W [V, d], without keeping [N, V] logits.

    Forward runs the head over vocabulary chunks and, when a gradient is wanted, folds the backward in at
    once: d log p_i / d h_i = (onehot(t_i) - softmax(W h_i)) W, a [N, d] Jacobian (each row's log-prob
    depends on its own hidden state only), so backward is grad[:, None] * J. Same FLOPs as autograd
    through F.linear + cross_entropy, a fraction of the memory, no [N, V] softmax or zero fill.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        h = hidden.to(weight.dtype)
        starts = range(0, weight.shape[0], chunk)
        logits = [F.linear(h, weight[s:s + chunk]).float() for s in starts]  # each [N, <= chunk]
        lse = torch.stack([c.logsumexp(-1) for c in logits], -1).logsumexp(-1)  # [N]
        rows = torch.arange(n, device=hidden.device)
        picked = torch.empty(n, dtype=torch.float32, device=hidden.device)
        best = torch.full((n,), -torch.inf, dtype=torch.float32, device=hidden.device)
        best_id = torch.zeros(n, dtype=torch.int64, device=hidden.device)
        for s, c in zip(starts, logits, strict=True):
            inside = (targets >= s) & (targets < s + c.shape[1])
            picked[inside] = c[rows[inside], targets[inside] - s]
            value, index = c.max(-1)
            better = value > best  # the first maximum wins, as argmax over the whole row
            best, best_id = torch.where(better, value, best), torch.where(better, index + s, best_id)
        jacobian = None
        if ctx.needs_input_grad[0]:
            jacobian = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=hidden.device)
            for s, c in zip(starts, logits, strict=True):
                probs = c.sub_(lse[:, None]).exp_()  # softmax columns of this chunk, in place
                inside = (targets >= s) & (targets < s + c.shape[1])
                probs[rows[inside], targets[inside] - s] -= 1.0  # softmax - onehot
                jacobian -= (probs.to(weight.dtype) @ weight[s:s + c.shape[1]]).float()
        ctx.save_for_backward(jacobian)
        ctx.hidden_dtype = hidden.dtype
        correct = best_id == targets
        ctx.mark_non_differentiable(correct)
        return picked - lse, correct

    @staticmethod
    def backward(ctx, grad_logprobs: torch.Tensor, _grad_correct: torch.Tensor) -> tuple:
        (jacobian,) = ctx.saved_tensors
        return (grad_logprobs[:, None] * jacobian).to(ctx.hidden_dtype), None, None, None


def target_logprobs(model: Transformer, hidden: torch.Tensor, batch: PackedBatch, *, chunk: int = VOCAB_CHUNK
                    ) -> TargetLogprobs:
    """log p(target) [N] of a row's targets (logits of the target positions only, vocabulary in chunks)."""
    logprobs, correct = _TargetLogprobsFunction.apply(hidden.index_select(0, batch.target_index),
                                                      model.output_weight(), batch.target_ids, chunk)
    return TargetLogprobs(logprobs=logprobs, correct=correct)


def all_logits(model: Transformer, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] fp32 of every position (tests, evaluation of whole sequences)."""
    return F.linear(hidden, model.output_weight()).float()

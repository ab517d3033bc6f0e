"""Fused sampling over a batch of logits rows.

Order of operations (vLLM's): repetition penalty -> frequency/presence penalties -> temperature
-> min-p -> top-k -> top-p -> Gumbel-max draw with counter-based noise keyed on
(seed, position, vocabulary index). Greedy rows (temperature 0) take the argmax, ties to the
lowest index. Logprobs, when asked for, are the raw model log-softmax of the chosen token.

The Triton kernels and their launcher live above `sample_reference` (kernels issue);
`sample_reference` is both the CPU path and the test oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.philox import philox_randint, philox_uniform

# u is clamped away from 0 so that -log(-log(u)) stays finite (vLLM's bound).
_MIN_UNIFORM = 4.66e-10


@dataclass
class SamplingMetadata:
    """Per-row sampling parameters for one decode step; every tensor has B rows, on the logits' device."""

    temperature: torch.Tensor  # [B] float32; 0 means greedy
    top_k: torch.Tensor  # [B] int32; 0 means off
    top_p: torch.Tensor  # [B] float32; 1.0 means off
    min_p: torch.Tensor  # [B] float32; 0.0 means off
    presence_penalty: torch.Tensor  # [B] float32; 0.0 means off
    frequency_penalty: torch.Tensor  # [B] float32; 0.0 means off
    repetition_penalty: torch.Tensor  # [B] float32; 1.0 means off
    seed: torch.Tensor  # [B] int64, each in [0, 2**32)
    position: torch.Tensor  # [B] int32; index of the token being drawn in its sequence
    output_counts: torch.Tensor | None = None  # [B, V] int32 occurrences in the generated tokens
    prompt_mask: torch.Tensor | None = None  # [B, V] bool: token occurs in the prompt
    want_logprobs: bool = False  # also return the chosen tokens' logprobs

    @property
    def needs_penalties(self) -> bool:
        return self.output_counts is not None


def apply_penalties_reference(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition, frequency and presence penalties (vLLM formulas) on fp32 logits [B, V]."""
    if meta.output_counts is None:
        return logits
    counts = meta.output_counts
    seen = counts > 0
    if meta.prompt_mask is not None:
        seen = seen | meta.prompt_mask
    rep = meta.repetition_penalty[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - meta.frequency_penalty[:, None] * counts.to(logits.dtype)
    logits = logits - meta.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
    return logits


def apply_top_k_top_p_min_p_reference(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Writes -inf into filtered entries of temperature-scaled logits [B, V] (sort-based, exact ties).

    min-p keeps p >= min_p * max p; top-k keeps every token whose logit is >= the k-th largest
    (ties at the boundary are kept); top-p keeps the smallest prefix of the sorted distribution
    whose mass reaches p (the token that crosses p is kept, and so are its ties).
    """
    vocab = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    keep = probs >= meta.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    sorted_logits, _ = torch.sort(logits, dim=-1, descending=True)
    k = torch.where(meta.top_k > 0, meta.top_k.clamp(max=vocab), vocab).to(torch.int64)
    kth = sorted_logits.gather(-1, (k - 1)[:, None])
    keep &= logits >= kth
    sorted_probs = torch.softmax(sorted_logits.masked_fill(sorted_logits < kth, float("-inf")), dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    # The last kept position is the first one whose preceding mass is < p; its logit is the cut.
    n_keep = (mass_before < meta.top_p[:, None]).sum(dim=-1).clamp(min=1)
    cut = sorted_logits.gather(-1, (n_keep - 1)[:, None])
    keep &= (logits >= cut) | (meta.top_p[:, None] >= 1.0)
    return logits.masked_fill(~keep, float("-inf"))


def gumbel_noise_reference(meta: SamplingMetadata, vocab: int, device: torch.device) -> torch.Tensor:
    """Gumbel noise [B, V]: g = -log(-log(u)), u = rand(randint(seed, position), vocab index)."""
    row_key = philox_randint(meta.seed.to(device), meta.position.to(device))  # [B]
    u = philox_uniform(row_key[:, None], torch.arange(vocab, device=device)[None, :])
    u = u.clamp(min=_MIN_UNIFORM)
    return -torch.log(-torch.log(u))


def sample_reference(logits: torch.Tensor, meta: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draws one token per row. logits: [B, V] any float dtype. Returns (tokens [B] int64, logprobs [B] | None)."""
    raw = logits.float()
    x = apply_penalties_reference(raw, meta)
    greedy = meta.temperature <= 0
    tokens_greedy = torch.argmax(x, dim=-1)  # first maximum: ties go to the lowest index
    temperature = torch.where(greedy, torch.ones_like(meta.temperature), meta.temperature)
    x = x / temperature[:, None]
    x = apply_top_k_top_p_min_p_reference(x, meta)
    x = x + gumbel_noise_reference(meta, x.shape[-1], x.device)
    tokens = torch.where(greedy, tokens_greedy, torch.argmax(x, dim=-1))
    logprobs = None
    if meta.want_logprobs:
        logprobs = torch.log_softmax(raw, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs

"""Training objectives on a packed row's target logits: SFT cross entropy, DPO's sequence log-ratios.

SFT is a token mean over the whole optimizer step: each row contributes sum(CE) / (targets in the
step), so how the step is cut into rows changes nothing but float summation order. DPO (Rafailov et
al., 2023): loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with pi/ref the summed
log-probabilities of the reply tokens under the policy (base + adapters) and the frozen reference
(the base model, adapters off); the implicit rewards are beta * (pi - ref).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.fine_tuning.packing import PackedBatch


@dataclass
class TokenScores:
    """Summed SFT scores of some target tokens."""

    loss_sum: torch.Tensor  # [] fp32, sum of -log p(target); carries the graph when training
    correct: int  # targets that are the argmax of their logits
    count: int  # targets scored


def token_scores(logits: torch.Tensor, batch: PackedBatch) -> TokenScores:
    """Cross entropy summed over the row's targets (logits [N, V] fp32 from target_logits)."""
    loss_sum = F.cross_entropy(logits, batch.target_ids, reduction="sum")
    correct = int((logits.detach().argmax(-1) == batch.target_ids).sum())
    return TokenScores(loss_sum=loss_sum, correct=correct, count=int(batch.target_ids.numel()))


def sequence_logprobs(logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """[S] fp32: sum over each sequence's targets of log p(target) (logits [N, V] from target_logits)."""
    picked = -F.cross_entropy(logits, batch.target_ids, reduction="none")  # [N] log p(target)
    return picked.new_zeros(batch.num_sequences).index_add(0, batch.target_sequence, picked)


@dataclass
class PreferenceScores:
    """DPO terms of some pairs, each [P] fp32."""

    losses: torch.Tensor  # -log sigmoid(beta * margin); carries the graph when training
    chosen_rewards: torch.Tensor  # beta * (pi_c - ref_c), detached
    rejected_rewards: torch.Tensor  # beta * (pi_r - ref_r), detached


def preference_scores(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                      reference_rejected: torch.Tensor, beta: float) -> PreferenceScores:
    """DPO loss and implicit rewards of P pairs from their summed log-probabilities (each [P])."""
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    return PreferenceScores(losses=-F.logsigmoid(chosen - rejected), chosen_rewards=chosen.detach(),
                            rejected_rewards=rejected.detach())

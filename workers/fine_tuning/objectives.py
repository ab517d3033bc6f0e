"""Training objectives on a packed row's target log-probs: SFT cross entropy, DPO's sequence log-ratios.

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
from workers.fine_tuning.train_forward import TargetLogprobs


@dataclass
class TokenScores:
    """Summed SFT scores of some target tokens."""

    loss_sum: torch.Tensor  # [] fp32, sum of -log p(target); carries the graph when training
    correct: int  # targets that are the argmax of their logits
    count: int  # targets scored


def token_scores(target: TargetLogprobs) -> TokenScores:
    """Cross entropy summed over a row's targets."""
    return TokenScores(loss_sum=-target.logprobs.sum(), correct=int(target.correct.sum()),
                       count=int(target.logprobs.numel()))


def sequence_logprobs(target: TargetLogprobs, batch: PackedBatch) -> torch.Tensor:
    """[S] fp32: sum over each sequence's targets of log p(target)."""
    return target.logprobs.new_zeros(batch.num_sequences).index_add(0, batch.target_sequence, target.logprobs)


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

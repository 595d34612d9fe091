"""Preference losses as small pure functions over per-sequence log-probabilities.

Every function takes summed log-probs of whole completions (shape ``[B]``) and
returns per-example losses plus the implicit rewards the loss defines, so the
trainer can log margins and accuracies the same way for every loss. Nothing
here imports anything but torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290).

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

    Args:
        policy_chosen_logps: ``[B]`` log pi(y_chosen | x), summed over completion tokens.
        policy_rejected_logps: ``[B]`` log pi(y_rejected | x).
        reference_chosen_logps: ``[B]`` the same under the frozen reference model.
        reference_rejected_logps: ``[B]``.
        beta: strength of the implicit KL penalty.

    Returns:
        losses ``[B]``, chosen_rewards ``[B]`` and rejected_rewards ``[B]``, where a
        reward is ``beta * (log pi - log ref)`` (detached).
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306).

    With r = log pi(y|x) - log ref(y|x) and the reference point z = kl (>= 0, no gradient):
    desirable:   w_d * (1 - sigmoid(beta * (r - z)))
    undesirable: w_u * (1 - sigmoid(beta * (z - r)))

    Args:
        policy_logps: ``[B]`` log pi(y | x) of each completion.
        reference_logps: ``[B]`` log ref(y | x).
        desirable: ``[B]`` bool, True for label 1.
        kl: scalar estimate of KL(pi || ref), from mismatched (x, y') pairs; it is
            clamped at 0 and detached here, as in the paper.
        beta, desirable_weight, undesirable_weight: hyperparameters (lambda_D, lambda_U).

    Returns:
        losses ``[B]`` and rewards ``[B]`` (``beta * r``, detached).
    """
    z = kl.detach().clamp(min=0)
    logratios = policy_logps - reference_logps
    desirable = desirable.bool()
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, beta * logratios.detach()

"""Preference losses as small pure functions over per-sequence log-probabilities.

Every function takes log-probs of whole completions, summed over their tokens
(shape ``[B]``), the completions' token counts where the loss normalises by
length, and its hyperparameters. It returns per-example losses plus the implicit
rewards the loss defines (detached), so the trainer can log margins and
accuracies the same way for every loss. Nothing here imports anything but torch.

Which loss trains on which feedback, whether it needs the reference model, and
how the trainer calls it is in the registry ``iteralign.train.objectives`` (and
the table of docs/training.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- paired, with a reference
def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    nll_weight: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290),
    with the optional NLL term of RPO (Pang et al. 2024, https://arxiv.org/abs/2404.19733) and
    the optional label smoothing of conservative DPO (Mitchell 2023, https://ericmitchell.ai/cdpo.pdf).

    With h = beta * ((pi_c - ref_c) - (pi_r - ref_r)) and eps = label_smoothing, the
    probability that a label is flipped:
    loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h) + nll_weight * (-pi_c / |y_c|)

    Args:
        policy_chosen_logps: ``[B]`` log pi(y_chosen | x), summed over completion tokens.
        policy_rejected_logps: ``[B]`` log pi(y_rejected | x).
        reference_chosen_logps: ``[B]`` the same under the frozen reference model.
        reference_rejected_logps: ``[B]``.
        beta: strength of the implicit KL penalty.
        nll_weight: RPO's alpha; 0 is plain DPO. The NLL is per token of the chosen completion.
        chosen_lengths: ``[B]`` token counts of the chosen completions; needed when nll_weight > 0.
        label_smoothing: cDPO's eps in [0, 0.5); 0 is plain DPO.

    Returns:
        losses ``[B]``, chosen_rewards ``[B]`` and rejected_rewards ``[B]``, where a
        reward is ``beta * (log pi - log ref)`` (detached).
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    if label_smoothing:
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    else:
        losses = -F.logsigmoid(logits)
    if nll_weight:
        if chosen_lengths is None:
            raise ValueError("dpo_loss: nll_weight > 0 needs chosen_lengths")
        losses = losses + nll_weight * (-policy_chosen_logps / chosen_lengths)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def cdpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor, beta: float,
              label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Conservative DPO (``training.loss: cdpo``): :func:`dpo_loss` with label smoothing and no NLL term."""
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                    beta, label_smoothing=label_smoothing)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Identity Preference Optimisation (Azar et al. 2023, https://arxiv.org/abs/2310.12036), Eq. 17.

    With per-token log-ratios h_c = (pi_c - ref_c) / |y_c| and h_r = (pi_r - ref_r) / |y_r|:
    loss = (h_c - h_r - 1 / (2 * tau))^2. The squared loss regresses the margin to
    1 / (2 tau) instead of pushing it to infinity. Log-ratios are averaged per token
    (as TRL, who checked it with the paper's authors), so tau means the same at any length.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
            reference_rejected_logps: ``[B]`` summed log-probs.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts.
        tau: regularisation strength (``training.beta``).

    Returns:
        losses ``[B]``, chosen_rewards ``[B]``, rejected_rewards ``[B]``: ``tau * h`` (detached).
    """
    chosen_logratios = (policy_chosen_logps - reference_chosen_logps) / chosen_lengths
    rejected_logratios = (policy_rejected_logps - reference_rejected_logps) / rejected_lengths
    losses = (chosen_logratios - rejected_logratios - 1 / (2 * tau)) ** 2
    return losses, tau * chosen_logratios.detach(), tau * rejected_logratios.detach()


# ---------------------------------------------------------------- paired, reference-free
def slic_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    margin: float,
    nll_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SLiC-HF calibration loss (Zhao et al. 2023, https://arxiv.org/abs/2305.10425), reference-free.

    loss = max(0, margin - pi_c + pi_r) + nll_weight * (-pi_c / |y_c|)

    A hinge on the sequence log-likelihood margin, plus the paper's regularising NLL
    term, taken (as HALOs) on the chosen completion and averaged per token.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed log-probs.
        chosen_lengths: ``[B]`` chosen completion token counts.
        margin: delta, the log-likelihood margin the hinge asks for.
        nll_weight: lambda, the weight of the NLL regulariser.

    Returns:
        losses ``[B]``, chosen_rewards ``[B]``, rejected_rewards ``[B]``: the sequence
        log-probs themselves (detached), which is what the hinge ranks.
    """
    hinge = torch.clamp(margin - policy_chosen_logps + policy_rejected_logps, min=0)
    losses = hinge + nll_weight * (-policy_chosen_logps / chosen_lengths)
    return losses, policy_chosen_logps.detach(), policy_rejected_logps.detach()


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Simple Preference Optimization (Meng et al. 2024, https://arxiv.org/abs/2405.14734), reference-free.

    The implicit reward is the length-normalised log-likelihood r = beta * log pi(y|x) / |y|;
    loss = -log sigmoid(r_c - r_r - gamma), gamma being a target reward margin.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed log-probs.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts.
        beta: reward scale (the paper uses 2.0 to 2.5).
        gamma: target margin (the paper uses 0.5 to 1.5 for beta around 2).

    Returns:
        losses ``[B]``, chosen_rewards ``[B]``, rejected_rewards ``[B]`` (``r``, detached).
    """
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    odds_ratio_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Odds Ratio Preference Optimization (Hong et al. 2024, https://arxiv.org/abs/2403.07691), reference-free.

    With the per-token average log-likelihood a = log pi(y|x) / |y| and
    log odds(y) = a - log(1 - exp(a)):
    loss = -a_c + lambda * -log sigmoid(log odds(y_c) - log odds(y_r)).
    The first term is the SFT loss on the chosen completion, the second the odds-ratio penalty.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed log-probs.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts.
        odds_ratio_weight: lambda (the paper uses 0.1 to 0.25).

    Returns:
        losses ``[B]``, chosen_rewards ``[B]``, rejected_rewards ``[B]``: ``lambda * a`` (detached), as TRL logs them.
    """
    chosen_mean = policy_chosen_logps / chosen_lengths
    rejected_mean = policy_rejected_logps / rejected_lengths
    # log(1 - exp(a)) = log(-expm1(a)): exact for a close to 0, where 1 - exp(a) underflows
    log_odds = (chosen_mean - torch.log(-torch.expm1(chosen_mean))) - (
        rejected_mean - torch.log(-torch.expm1(rejected_mean))
    )
    losses = -chosen_mean - odds_ratio_weight * F.logsigmoid(log_odds)
    return losses, odds_ratio_weight * chosen_mean.detach(), odds_ratio_weight * rejected_mean.detach()


# ---------------------------------------------------------------- unpaired
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


def sft_loss(policy_logps: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Supervised fine-tuning on the kept completions: rejection-sampling fine-tuning
    (RAFT, Dong et al. 2023, https://arxiv.org/abs/2304.06767), reference-free.

    loss = -log pi(y|x) / |y|, the per-token negative log-likelihood of each completion
    (each example weighs the same whatever its length).

    Args:
        policy_logps: ``[B]`` summed log-probs of the chosen/desirable completions.
        lengths: ``[B]`` their token counts.

    Returns:
        losses ``[B]`` and rewards ``[B]``: the per-token log-likelihood (detached).
    """
    mean_logps = policy_logps / lengths
    return -mean_logps, mean_logps.detach()


# ---------------------------------------------------------------- groups of scalar rewards
def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024, https://arxiv.org/abs/2402.03300).

    A_i = (r_i - mean of r in i's group) / (std of r in i's group + eps), the std being
    the sample standard deviation (n - 1). ``scale_by_std=False`` leaves out the
    division (Dr. GRPO, Liu et al. 2025, https://arxiv.org/abs/2503.20783). A group
    of one completion has no baseline: its advantage is 0.

    Args:
        rewards: ``[N]`` scalar rewards.
        group_ids: ``[N]`` integer id of each completion's group (its prompt).
        scale_by_std: divide by the group's standard deviation.
        eps: added to the std so a group of equal rewards gets 0, not NaN.

    Returns:
        ``[N]`` advantages (float).
    """
    rewards = rewards.float()
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=rewards.dtype).index_add_(0, inverse, rewards)
    means = sums / counts
    centred = rewards - means[inverse]
    squares = torch.zeros(len(counts), dtype=rewards.dtype).index_add_(0, inverse, centred**2)
    stds = torch.sqrt(squares / (counts - 1).clamp(min=1))
    advantages = centred / (stds[inverse] + eps) if scale_by_std else centred
    return torch.where(counts[inverse] > 1, advantages, torch.zeros_like(advantages))


def grpo_loss(
    policy_logps: torch.Tensor,
    old_logps: torch.Tensor,
    reference_logps: torch.Tensor | None,
    lengths: torch.Tensor,
    advantages: torch.Tensor,
    clip_epsilon: float,
    kl_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group Relative Policy Optimization (Shao et al. 2024, https://arxiv.org/abs/2402.03300),
    on per-sequence log-probs.

    The importance ratio is taken per sequence and normalised by length, as GSPO
    (Zheng et al. 2025, https://arxiv.org/abs/2507.18071): s = exp((pi - pi_old) / |y|).
    loss = -min(s * A, clip(s, 1 - eps, 1 + eps) * A) + kl_weight * k3, with GRPO's
    estimator of KL(pi || ref), k3 = exp(d) - d - 1 for d = (ref - pi) / |y| (>= 0).

    Args:
        policy_logps: ``[B]`` log pi(y|x) under the policy being trained.
        old_logps: ``[B]`` log pi_old(y|x) under the policy that sampled y (no gradient).
        reference_logps: ``[B]`` log ref(y|x), or None when kl_weight is 0.
        lengths: ``[B]`` completion token counts.
        advantages: ``[B]`` group-normalised advantages (:func:`group_advantages`).
        clip_epsilon: eps of the clipped ratio.
        kl_weight: beta of the KL penalty; 0 needs no reference.

    Returns:
        losses ``[B]``, kl ``[B]`` (k3, detached) and ratios ``[B]`` (s, detached).
    """
    ratios = torch.exp((policy_logps - old_logps.detach()) / lengths)
    surrogate = torch.minimum(ratios * advantages, torch.clamp(ratios, 1 - clip_epsilon, 1 + clip_epsilon) * advantages)
    losses = -surrogate
    if kl_weight:
        if reference_logps is None:
            raise ValueError("grpo_loss: kl_weight > 0 needs reference_logps")
        log_ratio = (reference_logps - policy_logps) / lengths
        kl = torch.exp(log_ratio) - log_ratio - 1
        losses = losses + kl_weight * kl
        kl = kl.detach()
    else:
        kl = torch.zeros_like(losses).detach()
    return losses, kl, ratios.detach()

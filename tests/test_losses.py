"""Each loss against values computed by hand."""

import math

import pytest
import torch

from iteralign.train.losses import (
    cdpo_loss,
    dpo_loss,
    group_advantages,
    grpo_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    sft_loss,
    simpo_loss,
    slic_loss,
)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_dpo_loss_matches_hand_computation():
    # pair 0: policy moved towards chosen; pair 1: towards rejected
    pc, pr = torch.tensor([-5.0, -8.0]), torch.tensor([-9.0, -4.0])
    rc, rr = torch.tensor([-6.0, -7.0]), torch.tensor([-8.0, -5.0])
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # pair 0: logits = 0.5 * ((-5 + 6) - (-9 + 8)) = 0.5 * (1 + 1) = 1.0
    # pair 1: logits = 0.5 * ((-8 + 7) - (-4 + 5)) = 0.5 * (-1 - 1) = -1.0
    assert losses.tolist() == pytest.approx([-math.log(_sigmoid(1.0)), -math.log(_sigmoid(-1.0))])
    assert chosen_r.tolist() == pytest.approx([0.5, -0.5])
    assert rejected_r.tolist() == pytest.approx([-0.5, 0.5])


def test_dpo_loss_is_log2_when_policy_equals_reference():
    x = torch.tensor([-3.0, -1.5])
    losses, _, _ = dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1)
    losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises chosen, lowers rejected


def test_rpo_adds_the_per_token_nll_of_the_chosen_completion():
    pc, pr, rc, rr = _t(-5.0), _t(-9.0), _t(-6.0), _t(-8.0)
    plain, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    with_nll, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, nll_weight=2.0, chosen_lengths=_t(4.0))
    # 2.0 * (5 / 4 tokens) = 2.5
    assert with_nll.item() == pytest.approx(plain.item() + 2.5)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(pc, pr, rc, rr, beta=0.5, nll_weight=1.0)


def test_cdpo_loss_matches_hand_computation():
    # logits = 0.5 * ((-5 + 6) - (-9 + 8)) = 1.0
    losses, chosen_r, rejected_r = cdpo_loss(_t(-5.0), _t(-9.0), _t(-6.0), _t(-8.0), beta=0.5, label_smoothing=0.1)
    expected = -0.9 * math.log(_sigmoid(1.0)) - 0.1 * math.log(_sigmoid(-1.0))
    assert losses.item() == pytest.approx(expected)
    assert (chosen_r.item(), rejected_r.item()) == pytest.approx((0.5, -0.5))


def test_cdpo_without_smoothing_is_dpo():
    args = (_t(-5.0, -2.0), _t(-9.0, -1.0), _t(-6.0, -3.0), _t(-8.0, -2.5))
    assert cdpo_loss(*args, beta=0.3, label_smoothing=0.0)[0].tolist() == pytest.approx(
        dpo_loss(*args, beta=0.3)[0].tolist())


def test_ipo_loss_matches_hand_computation():
    # h_c = (-4 + 6) / 2 = 1, h_r = (-9 + 8) / 4 = -0.25; target 1 / (2 * 0.5) = 1
    losses, chosen_r, rejected_r = ipo_loss(_t(-4.0), _t(-9.0), _t(-6.0), _t(-8.0), _t(2.0), _t(4.0), tau=0.5)
    assert losses.item() == pytest.approx((1.25 - 1.0) ** 2)
    assert (chosen_r.item(), rejected_r.item()) == pytest.approx((0.5, -0.125))


def test_ipo_loss_is_zero_at_its_target_margin():
    # h_c - h_r = 1 / (2 tau) = 2.5 for tau = 0.2
    losses, _, _ = ipo_loss(_t(-3.0), _t(-7.5), _t(-5.0), _t(-7.0), _t(1.0), _t(1.0), tau=0.2)
    assert losses.item() == pytest.approx(0.0, abs=1e-10)


def test_slic_loss_matches_hand_computation():
    # example 0: hinge max(0, 1 - (-3) + (-3.5)) = 0.5, nll 0.1 * 3 / 2 = 0.15
    # example 1: margin met, hinge 0, nll 0.1 * 2 / 4 = 0.05
    losses, chosen_r, rejected_r = slic_loss(_t(-3.0, -2.0), _t(-3.5, -6.0), _t(2.0, 4.0), margin=1.0,
                                             nll_weight=0.1)
    assert losses.tolist() == pytest.approx([0.65, 0.05])
    assert chosen_r.tolist() == [-3.0, -2.0] and rejected_r.tolist() == [-3.5, -6.0]


def test_simpo_loss_matches_hand_computation():
    # r_c = 2 * -4 / 2 = -4, r_r = 2 * -9 / 3 = -6; loss = -log sigmoid(-4 + 6 - 0.5)
    losses, chosen_r, rejected_r = simpo_loss(_t(-4.0), _t(-9.0), _t(2.0), _t(3.0), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(-math.log(_sigmoid(1.5)))
    assert (chosen_r.item(), rejected_r.item()) == pytest.approx((-4.0, -6.0))


def test_orpo_loss_matches_hand_computation():
    # a_c = -2 / 4 = -0.5, a_r = -6 / 3 = -2; log odds(a) = a - log(1 - e^a)
    log_odds = (-0.5 - math.log(1 - math.exp(-0.5))) - (-2.0 - math.log(1 - math.exp(-2.0)))
    losses, chosen_r, rejected_r = orpo_loss(_t(-2.0), _t(-6.0), _t(4.0), _t(3.0), odds_ratio_weight=0.1)
    assert losses.item() == pytest.approx(0.5 - 0.1 * math.log(_sigmoid(log_odds)))
    assert (chosen_r.item(), rejected_r.item()) == pytest.approx((-0.05, -0.2))


def test_kto_loss_matches_hand_computation():
    policy = torch.tensor([-4.0, -6.0])
    reference = torch.tensor([-5.0, -5.0])
    desirable = torch.tensor([True, False])
    kl = torch.tensor(0.4)
    losses, rewards = kto_loss(policy, reference, desirable, kl, beta=0.5, desirable_weight=1.0,
                               undesirable_weight=2.0)
    # desirable: r = 1, loss = 1 - sigmoid(0.5 * (1 - 0.4)) = 1 - sigmoid(0.3)
    # undesirable: r = -1, loss = 2 * (1 - sigmoid(0.5 * (0.4 - (-1)))) = 2 * (1 - sigmoid(0.7))
    assert losses.tolist() == pytest.approx([1 - _sigmoid(0.3), 2 * (1 - _sigmoid(0.7))])
    assert rewards.tolist() == pytest.approx([0.5, -0.5])


def test_kto_clamps_negative_kl_to_zero_and_passes_no_gradient_through_it():
    policy = torch.tensor([-4.0], requires_grad=True)
    kl = torch.tensor(-3.0, requires_grad=True)
    losses, _ = kto_loss(policy, torch.tensor([-5.0]), torch.tensor([True]), kl, beta=1.0)
    assert losses.item() == pytest.approx(1 - _sigmoid(1.0))  # z = max(kl, 0) = 0
    losses.sum().backward()
    assert kl.grad is None
    assert policy.grad.item() < 0


def test_sft_loss_is_the_per_token_nll():
    losses, rewards = sft_loss(_t(-6.0, -1.0), _t(3.0, 4.0))
    assert losses.tolist() == pytest.approx([2.0, 0.25])
    assert rewards.tolist() == pytest.approx([-2.0, -0.25])


def test_group_advantages_normalise_within_each_prompt():
    rewards = _t(1.0, 2.0, 3.0, 5.0, 5.0, 7.0)
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    # group 0: mean 2, sample std 1; group 1: equal rewards; group 2: a single completion
    advantages = group_advantages(rewards, groups, eps=1e-4)
    assert advantages.tolist() == pytest.approx([-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0])
    assert group_advantages(rewards, groups, scale_by_std=False).tolist() == pytest.approx([-1, 0, 1, 0, 0, 0])


def test_grpo_loss_matches_hand_computation():
    # example 0: ratio exp((-4 + 5) / 2) = e^0.5 > 1.2, A = 1: clipped, surrogate 1.2
    #            KL: d = (-6 + 4) / 2 = -1, k3 = e^-1 - (-1) - 1 = e^-1
    # example 1: ratio e^-0.5 < 0.8, A = -1: clipped, surrogate 0.8 * -1; d = 0, k3 = 0
    losses, kl, ratios = grpo_loss(_t(-4.0, -6.0), _t(-5.0, -5.0), _t(-6.0, -6.0), _t(2.0, 2.0), _t(1.0, -1.0),
                                   clip_epsilon=0.2, kl_weight=0.1)
    assert losses.tolist() == pytest.approx([-1.2 + 0.1 * math.exp(-1), 0.8])
    assert kl.tolist() == pytest.approx([math.exp(-1), 0.0], abs=1e-7)
    assert ratios.tolist() == pytest.approx([math.exp(0.5), math.exp(-0.5)])


def test_grpo_clipped_ratio_passes_no_policy_gradient_but_unclipped_does():
    policy = torch.tensor([-4.0, -5.1], requires_grad=True)
    # example 0 clipped as above; example 1: ratio e^-0.05, inside the range
    losses, _, _ = grpo_loss(policy, _t(-5.0, -5.0), None, _t(2.0, 2.0), _t(1.0, 1.0), clip_epsilon=0.2,
                             kl_weight=0.0)
    losses.sum().backward()
    assert policy.grad[0].item() == 0.0
    # d/dpi of -exp((pi - old) / 2) * A = -ratio / 2
    assert policy.grad[1].item() == pytest.approx(-math.exp(-0.05) / 2)


def test_grpo_with_a_kl_weight_needs_the_reference():
    with pytest.raises(ValueError, match="reference_logps"):
        grpo_loss(_t(-4.0), _t(-4.0), None, _t(2.0), _t(1.0), clip_epsilon=0.2, kl_weight=0.1)

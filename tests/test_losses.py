"""DPO and KTO against values computed by hand."""

import math

import pytest
import torch

from iteralign.train.losses import dpo_loss, kto_loss


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


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

"""The loss registry: for each ``training.loss``, what it trains on and how.

An :class:`Objective` says which feedback types the loss accepts, whether it trains
on pairs, whether it needs reference log-probs, how one feedback file becomes its
examples and their token tensors (train/data.py), and its micro-batch objective:
the per-example losses with the metric sums it logs, and how a step's summed
metrics become that step's means. The config checks, the reference job, the
trainer, the schedule estimate and rules/common.smk (through
``iteralign.config.uses_reference``) ask :data:`OBJECTIVES` instead of matching
loss names.

Adding a loss: its function in losses.py, an entry here, a row in the table of
docs/training.md (tests/test_loss_family.py checks the two agree).

torch is imported only inside the objectives: the config (and Snakemake, at parse
time) reads this table without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from iteralign.train import data


@dataclass(frozen=True)
class Objective:
    """One loss, as the pipeline sees it.

    ``objective(batch, logps, lengths, training, device, reference_point)`` gets a
    micro-batch of token examples (as ``tensors`` built them), the policy's summed
    log-probs and token counts of its sequences (``[2B]`` chosen then rejected when
    ``paired``, else ``[B]``) and KTO's reference point (None for other losses); it
    returns per-example losses ``[B]`` and detached metric sums. ``means(sums, n)``
    turns a step's sums over ``n`` examples into that step's logged means.
    """

    feedback_types: frozenset[str]
    paired: bool
    needs_reference: Callable[[dict], bool]  # of the training section
    examples: Callable[[list[dict], int], list]  # (feedback items of one file, seed) -> examples
    tensors: Callable[..., list[dict]]  # (examples, encode, reference, training) -> token examples
    objective: Callable
    means: Callable[[dict, int], dict]
    examples_per_pair: int = 1  # training examples one pairwise item gives (the schedule's estimate)
    old_policy: bool = False  # score each completion under the round's starting policy before training
    reference_point: bool = False  # estimate KL(pi || ref) on mismatched pairs before each step
    on_policy: bool = False  # trains on its own round's samples only (training.history: current)
    groups: bool = False  # compares completions within a prompt's group (sampling.num_samples >= 2)


def always(training: dict) -> bool:
    """A loss that always needs the reference log-probs."""
    return True


def never(training: dict) -> bool:
    """A reference-free loss."""
    return False


def grpo_needs_reference(training: dict) -> bool:
    """GRPO looks at the reference only for its KL penalty."""
    return training["grpo"]["kl_weight"] != 0


def _values(batch: list[dict], key: str, device):
    """A float32 tensor of one field over a micro-batch (None for reference-free losses)."""
    import torch

    if batch[0][key] is None:
        return None
    return torch.tensor([b[key] for b in batch], dtype=torch.float32, device=device)


# ---------------------------------------------------------------- paired losses
class PairLogps(NamedTuple):
    """``[B]`` summed log-probs of a micro-batch's pairs (reference ones None when reference-free),
    and their completion token counts."""

    policy_chosen: Any
    policy_rejected: Any
    reference_chosen: Any
    reference_rejected: Any
    chosen_lengths: Any
    rejected_lengths: Any


def _losses():
    """losses.py, imported when a loss is computed (it imports torch)."""
    from iteralign.train import losses

    return losses


def _dpo(t: dict, p: PairLogps):
    return _losses().dpo_loss(p.policy_chosen, p.policy_rejected, p.reference_chosen, p.reference_rejected,
                              t["beta"], t["dpo"]["nll_weight"], p.chosen_lengths)


def _cdpo(t: dict, p: PairLogps):
    return _losses().cdpo_loss(p.policy_chosen, p.policy_rejected, p.reference_chosen, p.reference_rejected,
                               t["beta"], t["cdpo"]["label_smoothing"])


def _ipo(t: dict, p: PairLogps):
    return _losses().ipo_loss(p.policy_chosen, p.policy_rejected, p.reference_chosen, p.reference_rejected,
                              p.chosen_lengths, p.rejected_lengths, t["beta"])


def _slic(t: dict, p: PairLogps):
    return _losses().slic_loss(p.policy_chosen, p.policy_rejected, p.chosen_lengths, t["slic"]["margin"],
                               t["slic"]["nll_weight"])


def _simpo(t: dict, p: PairLogps):
    return _losses().simpo_loss(p.policy_chosen, p.policy_rejected, p.chosen_lengths, p.rejected_lengths,
                                t["simpo"]["beta"], t["simpo"]["gamma"])


def _orpo(t: dict, p: PairLogps):
    return _losses().orpo_loss(p.policy_chosen, p.policy_rejected, p.chosen_lengths, p.rejected_lengths,
                               t["orpo"]["odds_ratio_weight"])


def paired_objective(pair_loss: Callable[[dict, PairLogps], tuple]) -> Callable:
    """The micro-batch objective of a paired loss: chosen and rejected came through one forward pass."""

    def objective(batch, logps, lengths, training, device, reference_point):
        n = len(batch)
        per_example, chosen_r, rejected_r = pair_loss(training, PairLogps(
            logps[:n], logps[n:], _values(batch, "reference_chosen", device),
            _values(batch, "reference_rejected", device), lengths[:n], lengths[n:]))
        return per_example, {
            "reward_chosen": chosen_r.sum().detach(), "reward_rejected": rejected_r.sum().detach(),
            "accuracy": (chosen_r > rejected_r).float().sum().detach(),
            "logp_chosen": logps[:n].detach().sum(), "logp_rejected": logps[n:].detach().sum(),
        }

    return objective


def paired_means(sums: dict, n: int) -> dict:
    """Per-pair means of the rewards, accuracy and log-probs, and the reward margin."""
    out = {k: sums[k] / n for k in ("reward_chosen", "reward_rejected", "accuracy", "logp_chosen", "logp_rejected")}
    out["margin"] = out["reward_chosen"] - out["reward_rejected"]
    return out


# ---------------------------------------------------------------- unpaired losses
def kto_objective(batch, logps, lengths, training, device, reference_point):
    """KTO against the step's reference point; rewards summed per label."""
    import torch

    desirable = torch.tensor([b["desirable"] for b in batch], device=device)
    kto = training["kto"]
    per_example, rewards = _losses().kto_loss(logps, _values(batch, "reference", device), desirable,
                                              reference_point, training["beta"], kto["desirable_weight"],
                                              kto["undesirable_weight"])
    return per_example, {"reward_desirable": rewards[desirable].sum().detach(),
                         "reward_undesirable": rewards[~desirable].sum().detach(),
                         "desirable": desirable.sum().detach()}


def kto_means(sums: dict, n: int) -> dict:
    """KTO's rewards are averaged within their label."""
    n_desirable = sums["desirable"]
    return {
        "reward_desirable": sums["reward_desirable"] / n_desirable if n_desirable else float("nan"),
        "reward_undesirable": sums["reward_undesirable"] / (n - n_desirable) if n > n_desirable else float("nan"),
        "desirable_fraction": n_desirable / n,
    }


def sft_objective(batch, logps, lengths, training, device, reference_point):
    """The per-token NLL; logs the per-token log-likelihood."""
    per_example, mean_logps = _losses().sft_loss(logps, lengths)
    return per_example, {"logp_per_token": mean_logps.sum().detach()}


def grpo_objective(batch, logps, lengths, training, device, reference_point):
    """GRPO against the old policy's log-probs; logs KL, ratio and the fraction clipped."""
    grpo = training["grpo"]
    advantages = _values(batch, "advantage", device)
    per_example, kl_terms, ratios = _losses().grpo_loss(
        logps, _values(batch, "old", device), _values(batch, "reference", device), lengths, advantages,
        grpo["clip_epsilon"], grpo["kl_weight"])
    clipped = ((ratios > 1 + grpo["clip_epsilon"]) & (advantages > 0)) | \
        ((ratios < 1 - grpo["clip_epsilon"]) & (advantages < 0))
    return per_example, {"kl": kl_terms.sum().detach(), "ratio": ratios.sum().detach(),
                         "clip_fraction": clipped.float().sum().detach()}


def means_of(*keys: str) -> Callable[[dict, int], dict]:
    """Means per example of the named sums."""
    return lambda sums, n: {k: sums[k] / n for k in keys}


# ---------------------------------------------------------------- the registry
def _paired_entry(pair_loss: Callable[[dict, PairLogps], tuple], needs_reference: Callable[[dict], bool]) -> Objective:
    return Objective(feedback_types=frozenset({"pairwise"}), paired=True, needs_reference=needs_reference,
                     examples=data.pair_examples, tensors=data.pair_tensors, objective=paired_objective(pair_loss),
                     means=paired_means)


OBJECTIVES: dict[str, Objective] = {
    "dpo": _paired_entry(_dpo, always),
    "cdpo": _paired_entry(_cdpo, always),
    "ipo": _paired_entry(_ipo, always),
    "slic": _paired_entry(_slic, never),
    "simpo": _paired_entry(_simpo, never),
    "orpo": _paired_entry(_orpo, never),
    # kto and sft also take pairwise feedback: each pair is split into a desirable and
    # an undesirable example (sft then keeps the desirable ones)
    "kto": Objective(feedback_types=frozenset({"binary", "pairwise"}), paired=False, needs_reference=always,
                     examples=data.kto_examples, tensors=data.kto_tensors, objective=kto_objective,
                     means=kto_means, examples_per_pair=2, reference_point=True),
    "sft": Objective(feedback_types=frozenset({"binary", "pairwise"}), paired=False, needs_reference=never,
                     examples=data.desirable_examples, tensors=data.sft_tensors, objective=sft_objective,
                     means=means_of("logp_per_token")),
    "grpo": Objective(feedback_types=frozenset({"scalar"}), paired=False, needs_reference=grpo_needs_reference,
                      examples=data.scored_examples, tensors=data.grpo_tensors, objective=grpo_objective,
                      means=means_of("kl", "ratio", "clip_fraction"), old_policy=True, on_policy=True, groups=True),
}


def objective_of(training: dict) -> Objective:
    """The registry entry of ``training.loss`` (a validated config names one of OBJECTIVES)."""
    return OBJECTIVES[training["loss"]]


def training_examples(items: list[dict], loss: str, seed: int) -> list[data.Pair] | list[data.Unpaired]:
    """The examples ``loss`` trains on, from one feedback file's items."""
    return OBJECTIVES[loss].examples(items, seed)

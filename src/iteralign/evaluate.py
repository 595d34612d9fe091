"""Held-out evaluation of one round's policy: the same prompts and decoding every round.

Metrics are pure functions over arrays (tested on crafted inputs); :func:`evaluate`
generates, scores, and estimates KL to the SFT reference on the round's own
generations: mean over prompts of log pi_n(y) - log pi_ref(y).
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)


def bootstrap_ci(values, n_resamples: int, seed: int, statistic=np.mean) -> list[float]:
    """Percentile bootstrap 95% interval of ``statistic`` over ``values`` (NaN dropped)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_resamples, len(values)))
    stats = statistic(values[idx], axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return [float(lo), float(hi)]


def win_scores(rewards, baseline_rewards) -> np.ndarray:
    """Per prompt: 1 win, 0.5 tie, 0 loss; NaN where either reward is missing."""
    a = np.asarray(rewards, dtype=float)
    b = np.asarray(baseline_rewards, dtype=float)
    scores = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
    scores[np.isnan(a) | np.isnan(b)] = np.nan
    return scores


def summarize(round_n: int, rewards, output_tokens, policy_logps, reference_logps, baseline_rewards,
              n_resamples: int, seed: int) -> dict:
    """The eval_r{n}.json fields. ``baseline_rewards``: round 0's rewards on the same prompts
    (aligned), or None at round 0."""
    rewards = np.asarray(rewards, dtype=float)
    failed = int(np.isnan(rewards).sum())
    if baseline_rewards is None:
        win_rate, win_ci = 0.5, [0.5, 0.5]
    else:
        wins = win_scores(rewards, baseline_rewards)
        win_rate = float(np.nanmean(wins)) if np.any(~np.isnan(wins)) else math.nan
        win_ci = bootstrap_ci(wins, n_resamples, seed + 1)
    kl = np.asarray(policy_logps, dtype=float) - np.asarray(reference_logps, dtype=float)
    return {
        "round": round_n,
        "num_prompts": int(len(rewards)),
        "mean_reward": float(np.nanmean(rewards)) if failed < len(rewards) else math.nan,
        "reward_ci95": bootstrap_ci(rewards, n_resamples, seed),
        "win_rate_vs_r0": win_rate,
        "win_rate_ci95": win_ci,
        "mean_output_tokens": float(np.mean(output_tokens)) if len(output_tokens) else math.nan,
        "kl_to_reference": float(np.mean(kl)) if len(kl) else math.nan,
        "failed_scores": failed,
    }


def evaluate(config: dict, round_n: int, prompts_frame, checkpoint: str, reference_checkpoint: str,
             baseline_frame=None):
    """Generate on the eval split, score, compute KL; returns (rows frame, summary dict)."""
    import torch

    from iteralign.modeling import default_device, load_causal_lm, load_tokenizer
    from iteralign.prompts import messages_from_cell
    from iteralign.sample import generate, sample_frame
    from iteralign.score import score_samples
    from iteralign.train.data import PromptRenderer, encode
    from iteralign.train.logps import batched_completion_logps

    ecfg, tcfg = config["evaluation"], config["training"]
    eval_prompts = prompts_frame[prompts_frame["split"] == "eval"].sort_values("prompt_id")
    prompts = [messages_from_cell(p) for p in eval_prompts["prompt"]]
    decoding = {"num_samples": 1, "temperature": ecfg["temperature"], "top_p": ecfg["top_p"],
                "max_new_tokens": ecfg["max_new_tokens"], "stop": config["sampling"]["stop"]}
    seed = config["seed"]  # the same seed every round: rounds differ only by the policy
    generation = generate(checkpoint, prompts, decoding, config, seed, progress=f"eval r{round_n}")
    frame = sample_frame(round_n, list(eval_prompts["prompt_id"]), prompts, generation.texts,
                         generation.completions, checkpoint, seed)
    rewards, _ = score_samples(frame, config)
    frame = frame.drop(columns=["sample_id"])
    frame["reward"] = rewards["reward"].to_numpy()
    frame["error"] = rewards["error"].to_numpy()

    # KL to the reference on these generations: log-probs under the policy and under SFT.
    trust = config["policy"]["trust_remote_code"]
    device = default_device()
    tokenizer = load_tokenizer(checkpoint, trust)
    render = PromptRenderer(tokenizer)
    encoded = [encode(tokenizer, render(pid, p), out, tcfg["max_length"], tcfg["max_prompt_length"])
               for pid, p, out in zip(frame["prompt_id"], prompts, frame["output"], strict=True)]
    batch = 2 * tcfg["micro_batch_size"]
    policy = generation.model if generation.model is not None else load_causal_lm(checkpoint, trust, device=device)
    backend = generation.backend
    del generation  # drop the sampler's reference to the policy before loading the reference model
    frame["policy_logp"], _ = batched_completion_logps(policy, encoded, tokenizer.pad_token_id, batch, device)
    if round_n == 0:
        frame["reference_logp"] = frame["policy_logp"]
    else:
        del policy
        reference = load_causal_lm(reference_checkpoint, trust, device=device)
        frame["reference_logp"], _ = batched_completion_logps(reference, encoded, tokenizer.pad_token_id, batch,
                                                              device)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    baseline = None
    if baseline_frame is not None:
        aligned = baseline_frame.set_index("prompt_id").reindex(frame["prompt_id"])
        if aligned["reward"].isna().all() and len(aligned):
            log.warning("round 0 evaluation shares no prompts with round %d", round_n)
        baseline = aligned["reward"].to_numpy()
    summary = summarize(round_n, frame["reward"].to_numpy(), frame["num_output_tokens"].to_numpy(),
                        frame["policy_logp"].to_numpy(), frame["reference_logp"].to_numpy(), baseline,
                        ecfg["bootstrap_samples"], config["seed"])
    summary["backend"] = backend
    return frame, summary

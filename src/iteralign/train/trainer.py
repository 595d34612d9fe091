"""One round of preference training on accelerate, resuming optimizer and scheduler state.

Read top to bottom: load the policy of round n-1 and its optimizer/scheduler
state, turn this round's feedback into token tensors with the reference
log-probs the ``reference`` job precomputed (this job never holds a reference
model), run the optimizer steps, write ``train_r{n}.jsonl`` and ``ckpt_r{n}/FINAL``.

Batching: a global batch of ``training.batch_size`` feedback items is split
across processes, then into micro-batches of ``micro_batch_size``; gradients are
accumulated and synchronised once per optimizer step. Each micro-batch loss is
scaled by ``world_size / global_batch`` so the step's gradient is the mean over
the global batch whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import numpy as np
import torch

from iteralign.artifacts import write_jsonl
from iteralign.feedback import check_trainable, load_feedback
from iteralign.modeling import load_causal_lm, load_tokenizer
from iteralign.train import losses
from iteralign.train.checkpoint import load_training_state, rng_state, save_checkpoint
from iteralign.train.data import (
    Pair,
    PromptRenderer,
    collate,
    completion_key,
    encode,
    training_examples,
)
from iteralign.train.logps import completion_logps

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- schedule
def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the base lr after ``step`` optimizer steps of the whole run."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def estimated_total_steps(config: dict) -> int:
    """Upper bound of optimizer steps over the whole run, for decaying schedules."""
    tcfg = config["training"]
    if tcfg["schedule_total_steps"]:
        return tcfg["schedule_total_steps"]
    k = config["sampling"]["num_samples"]
    fb = config["feedback"]
    per_prompt = {"pairwise": k // 2 if fb["pairwise"]["mode"] == "random" else 1}.get(fb["type"], k)
    if tcfg["loss"] == "kto" and fb["type"] == "pairwise":
        per_prompt *= 2
    items = config["prompts"]["per_round"] * per_prompt
    return config["rounds"] * tcfg["epochs"] * math.ceil(items / tcfg["batch_size"])


# ---------------------------------------------------------------- data
def load_reference_logps(paths: list[str | Path]) -> dict[tuple[str, str], float]:
    import pandas as pd

    table: dict[tuple[str, str], float] = {}
    for path in paths:
        frame = pd.read_parquet(path, columns=["prompt_id", "completion_key", "reference_logp"])
        table.update(zip(zip(frame.prompt_id, frame.completion_key, strict=True), frame.reference_logp.astype(float), strict=True))
    return table


class _Lookup:
    def __init__(self, table: dict, sources: list):
        self.table, self.sources = table, [str(s) for s in sources]

    def __call__(self, prompt_id: str, completion: str) -> float:
        key = (prompt_id, completion_key(completion))
        if key not in self.table:
            raise KeyError(
                f"no reference log-prob for prompt_id {prompt_id} completion {completion!r:.60} in "
                f"{self.sources}; the reference job must run on the same feedback file"
            )
        return self.table[key]


def build_examples(items: list[dict], config: dict, tokenizer, reference) -> tuple[list[dict], dict]:
    """Token ids + reference log-probs for every training example, and truncation counts."""
    tcfg = config["training"]
    render = PromptRenderer(tokenizer)
    counts = {"truncated_prompts": 0, "truncated_completions": 0, "sequences": 0}

    def enc(prompt_id, prompt, completion):
        e = encode(tokenizer, render(prompt_id, prompt), completion, tcfg["max_length"], tcfg["max_prompt_length"])
        counts["sequences"] += 1
        counts["truncated_prompts"] += e.truncated_prompt
        counts["truncated_completions"] += e.truncated_completion
        return e

    examples = []
    for ex in training_examples(items, tcfg["loss"], config["seed"]):
        if isinstance(ex, Pair):
            examples.append({
                "chosen": enc(ex.prompt_id, ex.prompt, ex.chosen),
                "rejected": enc(ex.prompt_id, ex.prompt, ex.rejected),
                "reference_chosen": reference(ex.prompt_id, ex.chosen),
                "reference_rejected": reference(ex.prompt_id, ex.rejected),
            })
        else:
            examples.append({
                "completion": enc(ex.prompt_id, ex.prompt, ex.completion),
                "reference": reference(ex.prompt_id, ex.completion),
                "desirable": ex.desirable,
                "kl": enc(ex.kl_prompt_id, ex.kl_prompt, ex.kl_completion),
                "reference_kl": reference(ex.kl_prompt_id, ex.kl_completion),
            })
    if counts["truncated_completions"]:
        log.warning("%d of %d sequences had their completion cut at training.max_length=%d",
                    counts["truncated_completions"], counts["sequences"], tcfg["max_length"])
    return examples, counts


# ---------------------------------------------------------------- loss of one micro-batch
def _micro_batch_loss(model, batch: list[dict], config: dict, pad_id: int, device, kl: torch.Tensor | None):
    """Sum of per-example losses of a micro-batch, and sums for the step's metrics."""
    tcfg = config["training"]
    beta = tcfg["beta"]
    if tcfg["loss"] == "dpo":
        # chosen and rejected in one forward pass
        tensors = collate([b["chosen"] for b in batch] + [b["rejected"] for b in batch], pad_id, device)
        logps, _ = completion_logps(model, **tensors)
        n = len(batch)
        ref = torch.tensor([[b["reference_chosen"], b["reference_rejected"]] for b in batch],
                           dtype=torch.float32, device=device)
        per_example, chosen_r, rejected_r = losses.dpo_loss(logps[:n], logps[n:], ref[:, 0], ref[:, 1], beta)
        metrics = {
            "reward_chosen": chosen_r.sum().item(),
            "reward_rejected": rejected_r.sum().item(),
            "accuracy": (chosen_r > rejected_r).float().sum().item(),
            "logp_chosen": logps[:n].detach().sum().item(),
            "logp_rejected": logps[n:].detach().sum().item(),
        }
        return per_example.sum(), metrics
    tensors = collate([b["completion"] for b in batch], pad_id, device)
    logps, _ = completion_logps(model, **tensors)
    ref = torch.tensor([b["reference"] for b in batch], dtype=torch.float32, device=device)
    desirable = torch.tensor([b["desirable"] for b in batch], device=device)
    kcfg = tcfg["kto"]
    per_example, rewards = losses.kto_loss(logps, ref, desirable, kl, beta,
                                           kcfg["desirable_weight"], kcfg["undesirable_weight"])
    metrics = {
        "reward_desirable": rewards[desirable].sum().item(),
        "reward_undesirable": rewards[~desirable].sum().item(),
        "desirable": desirable.sum().item(),
    }
    return per_example.sum(), metrics


def _reduce_sums(accelerator, loss_sum: float, step_metrics: dict[str, float]) -> dict[str, float]:
    """Sum the step's metric sums over processes (one collective per step)."""
    keys = sorted(step_metrics)
    packed = torch.tensor([loss_sum] + [step_metrics[k] for k in keys], dtype=torch.float64,
                          device=accelerator.device)
    packed = accelerator.reduce(packed, "sum").tolist()
    return {"loss": packed[0], **dict(zip(keys, packed[1:], strict=True))}


def _step_means(sums: dict[str, float], n: int) -> dict[str, float]:
    """Per-example means for the metrics line; KTO rewards are averaged within their label."""
    if "reward_chosen" in sums:
        out = {k: sums[k] / n for k in ("loss", "reward_chosen", "reward_rejected", "accuracy",
                                         "logp_chosen", "logp_rejected")}
        out["margin"] = out["reward_chosen"] - out["reward_rejected"]
        return out
    n_desirable = sums["desirable"]
    return {
        "loss": sums["loss"] / n,
        "reward_desirable": sums["reward_desirable"] / n_desirable if n_desirable else float("nan"),
        "reward_undesirable": sums["reward_undesirable"] / (n - n_desirable) if n > n_desirable else float("nan"),
        "desirable_fraction": n_desirable / n,
    }


@torch.no_grad()
def _kl_sums(model, batch: list[dict], pad_id: int, device, micro: int) -> torch.Tensor:
    """[sum of (log pi - log ref) over mismatched pairs, count] for KTO's reference point."""
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for start in range(0, len(batch), micro):
        chunk = batch[start : start + micro]
        logps, _ = completion_logps(model, **collate([b["kl"] for b in chunk], pad_id, device))
        ref = torch.tensor([b["reference_kl"] for b in chunk], dtype=torch.float64, device=device)
        total[0] += (logps.double() - ref).sum()
        total[1] += len(chunk)
    return total


# ---------------------------------------------------------------- the round
def train_round(
    config: dict,
    round_n: int,
    feedback_paths: list[str | Path],
    reference_paths: list[str | Path],
    init_checkpoint: str | Path,
    output_checkpoint: str | Path,
    metrics_path: str | Path,
    provenance=None,
) -> dict:
    from accelerate import Accelerator
    from tqdm import tqdm

    tcfg = config["training"]
    use_cpu = tcfg["gpus"] == 0 or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=use_cpu, mixed_precision="no" if use_cpu else tcfg["mixed_precision"])
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.manual_seed(config["seed"] * 1_000_003 + round_n)

    tokenizer = load_tokenizer(init_checkpoint, config["policy"]["trust_remote_code"])
    model = load_causal_lm(init_checkpoint, config["policy"]["trust_remote_code"])
    items = []
    for path in feedback_paths:
        file_items = load_feedback(path)
        check_trainable(file_items, tcfg["loss"], path)
        items.extend(file_items)
    reference = _Lookup(load_reference_logps(reference_paths), reference_paths)
    examples, truncation = build_examples(items, config, tokenizer, reference)

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=tcfg["lr"], betas=tuple(tcfg["adam_betas"]), eps=tcfg["adam_eps"],
        weight_decay=tcfg["weight_decay"],
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tcfg["schedule"], tcfg["warmup_steps"], estimated_total_steps(config))
    )
    previous, resumed = load_training_state(init_checkpoint, optimizer, scheduler)
    global_step = previous.get("global_step", 0)
    examples_seen = previous.get("examples_seen", 0)
    if resumed:
        log.info("round %d: resumed optimizer and scheduler at global step %d (lr %.3g)",
                 round_n, global_step, scheduler.get_last_lr()[0])
    else:
        log.info("round %d: %s has no optimizer state; starting a fresh optimizer", round_n, init_checkpoint)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    device, pad_id = accelerator.device, tokenizer.pad_token_id

    batch_size, micro = tcfg["batch_size"], tcfg["micro_batch_size"]
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total_steps = steps_per_epoch * tcfg["epochs"]
    if not examples:
        log.warning("round %d: the feedback has no trainable items; the policy is carried over unchanged", round_n)
    log.info("round %d: %d examples, %d steps of %d on %d process(es)", round_n, len(examples), total_steps,
             batch_size, world)
    rows: list[dict] = []
    progress = tqdm(total=total_steps, desc=f"train r{round_n}", disable=not accelerator.is_main_process,
                    mininterval=5)
    for epoch in range(tcfg["epochs"]):
        order = np.random.default_rng([config["seed"], round_n, epoch]).permutation(len(examples))
        for start in range(0, len(examples), batch_size):
            global_batch = [examples[i] for i in order[start : start + batch_size]]
            local = global_batch[rank::world]
            # a process without examples still joins the gradient all-reduce, with weight 0
            weight = 1.0 if local else 0.0
            local = local or global_batch[:1]
            kl = None
            if tcfg["loss"] == "kto":
                sums = accelerator.reduce(_kl_sums(model, local, pad_id, device, micro) * weight, "sum")
                kl = (sums[0] / sums[1].clamp(min=1)).float()
            chunks = [local[i : i + micro] for i in range(0, len(local), micro)]
            step_metrics: dict[str, float] = {}
            loss_sum = torch.zeros((), device=device)
            for index, chunk in enumerate(chunks):
                last = index == len(chunks) - 1
                context = contextlib.nullcontext() if last else accelerator.no_sync(model)
                with context, accelerator.autocast():
                    chunk_loss, chunk_metrics = _micro_batch_loss(model, chunk, config, pad_id, device, kl)
                    accelerator.backward(chunk_loss * weight * world / len(global_batch))
                loss_sum += chunk_loss.detach() * weight
                for key, value in chunk_metrics.items():
                    step_metrics[key] = step_metrics.get(key, 0.0) + value * weight
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), tcfg["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            examples_seen += len(global_batch)

            sums = _reduce_sums(accelerator, loss_sum.item(), step_metrics)
            row = {"round": round_n, "step": global_step, "round_step": global_step - previous.get("global_step", 0),
                   "epoch": epoch, "examples": len(global_batch), "lr": scheduler.get_last_lr()[0],
                   "grad_norm": float(grad_norm), "examples_seen": examples_seen,
                   **_step_means(sums, len(global_batch))}
            if kl is not None:
                row["kl"] = kl.item()
            rows.append(row)
            progress.update(1)
            if accelerator.is_main_process:
                log.info("round %d step %d loss %.4f lr %.3g grad_norm %.3f%s", round_n, global_step, row["loss"],
                         row["lr"], row["grad_norm"],
                         f" margin {row['margin']:.4f} accuracy {row['accuracy']:.3f}" if "margin" in row else
                         f" kl {row['kl']:.4f}")
    progress.close()

    state = {
        "round": round_n,
        "global_step": global_step,
        "examples_seen": examples_seen,
        "steps_this_round": total_steps,
        "epochs": tcfg["epochs"],
        "lr": scheduler.get_last_lr()[0],
        "world_size": world,
        "config_hash": provenance.base["config_hash"] if provenance else None,
        "truncation": truncation,
        "rng": rng_state(),
    }
    full_state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        write_jsonl(rows, metrics_path)
        extra = {"round": round_n, "steps": total_steps, "examples": len(examples), "truncation": truncation}
        save_checkpoint(
            output_checkpoint,
            accelerator.unwrap_model(model),
            tokenizer,
            state,
            optimizer_state=optimizer.state_dict(),
            scheduler_state=scheduler.state_dict(),
            provenance=provenance.record(**extra) if provenance else None,
            state_dict=full_state_dict,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return state

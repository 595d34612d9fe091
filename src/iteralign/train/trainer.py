"""One round of policy training on accelerate, resuming optimizer and scheduler state.

Read top to bottom: load the policy of round n-1 and its optimizer/scheduler
state, turn the round's feedback (this round's, or several rounds' with
``training.history``) into token tensors with the reference log-probs the
``reference`` jobs precomputed (this job never holds a reference model), run the
optimizer steps, write ``train_r{n}.jsonl`` and ``ckpt_r{n}/FINAL``.

Batching: a global batch of ``training.batch_size`` examples is sorted by length,
dealt round-robin to the processes, then cut into micro-batches of
``micro_batch_size``; gradients are accumulated and synchronised once per
optimizer step. Each micro-batch loss is scaled by ``world_size / global_batch``
so the step's gradient is the mean over the global batch whatever the number of
processes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch

from iteralign import tracking
from iteralign.artifacts import write_jsonl
from iteralign.config import PAIRED_LOSSES, history_rounds, round_seed, uses_reference
from iteralign.errors import UserError
from iteralign.feedback import check_trainable, load_feedback
from iteralign.modeling import load_causal_lm, load_tokenizer
from iteralign.train import losses
from iteralign.train.checkpoint import (
    load_training_state,
    optimizer_state_to_save,
    rng_state,
    save_checkpoint,
)
from iteralign.train.data import (
    Pair,
    PromptRenderer,
    collate,
    completion_key,
    encode,
    plan_batches,
    process_chunks,
    training_examples,
)
from iteralign.train.logps import batched_completion_logps, completion_logps
from iteralign.train.processes import make_accelerator

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
    if fb["type"] == "pairwise":
        per_prompt = k // 2 if fb["pairwise"]["mode"] == "random" else 1
        if tcfg["loss"] == "kto":
            per_prompt *= 2  # each pair is split in two
    else:
        per_prompt = k  # binary and scalar: one item per sample (sft keeps the desirable ones)
    items = config["prompts"]["per_round"] * per_prompt
    steps = sum(math.ceil(items * len(history_rounds(tcfg, n)) / tcfg["batch_size"])
                for n in range(1, config["rounds"] + 1))
    return tcfg["epochs"] * steps


# ---------------------------------------------------------------- data
def load_reference_logps(paths: list[str | Path]) -> dict[tuple[str, str], float]:
    from iteralign.artifacts import check_columns, read_parquet

    table: dict[tuple[str, str], float] = {}
    columns = ["prompt_id", "completion_key", "reference_logp"]
    for path in paths:
        frame = read_parquet(path)
        check_columns(frame, columns, path)
        table.update(zip(zip(frame.prompt_id, frame.completion_key, strict=True), frame.reference_logp.astype(float), strict=True))
    return table


class _Lookup:
    def __init__(self, table: dict, sources: list):
        self.table, self.sources = table, [str(s) for s in sources]

    def __call__(self, prompt_id: str, completion: str) -> float:
        key = (prompt_id, completion_key(completion))
        if key not in self.table:
            raise UserError(
                f"{', '.join(self.sources)}: no reference log-prob for prompt_id {prompt_id} completion "
                f"{completion!r:.60}; expected one for every feedback completion",
                hint="re-run the reference step on this round's feedback file",
            )
        return self.table[key]


def build_examples(feedback_paths: list[str | Path], config: dict, tokenizer, reference) -> tuple[list[dict], dict]:
    """Token ids (+ reference log-probs, advantages) of every training example, and truncation counts.

    Each feedback file is turned into examples on its own, as its reference job did
    (KTO's KL partners are drawn within a file). ``reference`` is None for reference-free losses.
    """
    tcfg = config["training"]
    loss = tcfg["loss"]
    render = PromptRenderer(tokenizer)
    counts = {"truncated_prompts": 0, "truncated_completions": 0, "sequences": 0}

    def enc(prompt_id, prompt, completion):
        e = encode(tokenizer, render(prompt_id, prompt), completion, tcfg["max_length"], tcfg["max_prompt_length"])
        counts["sequences"] += 1
        counts["truncated_prompts"] += e.truncated_prompt
        counts["truncated_completions"] += e.truncated_completion
        return e

    def ref(prompt_id, completion):
        return reference(prompt_id, completion) if reference is not None else None

    examples = []
    for path in feedback_paths:
        items = load_feedback(path)
        check_trainable(items, loss, path)
        file_examples = training_examples(items, loss, config["seed"])
        if loss == "grpo":
            group_ids = {pid: i for i, pid in enumerate(dict.fromkeys(ex.prompt_id for ex in file_examples))}
            advantages = losses.group_advantages(
                torch.tensor([ex.reward for ex in file_examples], dtype=torch.float64),
                torch.tensor([group_ids[ex.prompt_id] for ex in file_examples]),
                tcfg["grpo"]["scale_by_std"],
            ).tolist()
        for position, ex in enumerate(file_examples):
            if isinstance(ex, Pair):
                examples.append({
                    "chosen": enc(ex.prompt_id, ex.prompt, ex.chosen),
                    "rejected": enc(ex.prompt_id, ex.prompt, ex.rejected),
                    "reference_chosen": ref(ex.prompt_id, ex.chosen),
                    "reference_rejected": ref(ex.prompt_id, ex.rejected),
                })
            elif loss == "kto":
                examples.append({
                    "completion": enc(ex.prompt_id, ex.prompt, ex.completion),
                    "reference": ref(ex.prompt_id, ex.completion),
                    "desirable": ex.desirable,
                    "kl": enc(ex.kl_prompt_id, ex.kl_prompt, ex.kl_completion),
                    "reference_kl": ref(ex.kl_prompt_id, ex.kl_completion),
                })
            elif loss == "grpo":
                examples.append({
                    "completion": enc(ex.prompt_id, ex.prompt, ex.completion),
                    "reference": ref(ex.prompt_id, ex.completion),
                    "advantage": advantages[position],
                })
            else:  # sft
                examples.append({"completion": enc(ex.prompt_id, ex.prompt, ex.completion)})
    if counts["truncated_prompts"]:
        log.warning("%d of %d sequences had their prompt cut to its last training.max_prompt_length=%d tokens",
                    counts["truncated_prompts"], counts["sequences"], tcfg["max_prompt_length"])
    if counts["truncated_completions"]:
        log.warning("%d of %d sequences had their completion cut at training.max_length=%d",
                    counts["truncated_completions"], counts["sequences"], tcfg["max_length"])
    return examples, counts


def example_length(example: dict) -> int:
    """Tokens of the longest sequence an example puts in its forward pass."""
    return max(len(example[key].input_ids) for key in ("chosen", "rejected", "completion") if key in example)


# ---------------------------------------------------------------- loss of one micro-batch
def _values(batch: list[dict], key: str, device) -> torch.Tensor | None:
    """A float32 tensor of one field over a micro-batch (None for reference-free losses)."""
    if batch[0][key] is None:
        return None
    return torch.tensor([b[key] for b in batch], dtype=torch.float32, device=device)


def paired_objective(tcfg: dict, policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                     chosen_lengths, rejected_lengths):
    """The configured paired loss: per-example losses, chosen and rejected rewards."""
    loss, beta = tcfg["loss"], tcfg["beta"]
    if loss == "dpo":
        return losses.dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta,
                               tcfg["dpo"]["nll_weight"], chosen_lengths)
    if loss == "cdpo":
        return losses.cdpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta,
                                tcfg["cdpo"]["label_smoothing"])
    if loss == "ipo":
        return losses.ipo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                               chosen_lengths, rejected_lengths, beta)
    if loss == "slic":
        return losses.slic_loss(policy_chosen, policy_rejected, chosen_lengths, tcfg["slic"]["margin"],
                                tcfg["slic"]["nll_weight"])
    if loss == "simpo":
        return losses.simpo_loss(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths,
                                 tcfg["simpo"]["beta"], tcfg["simpo"]["gamma"])
    if loss == "orpo":
        return losses.orpo_loss(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths,
                                tcfg["orpo"]["odds_ratio_weight"])
    raise UserError(f"training.loss: {loss!r} is not a paired loss; expected one of {PAIRED_LOSSES}")


def _micro_batch_loss(model, batch: list[dict], tcfg: dict, pad_id: int, device, kl: torch.Tensor | None):
    """Sum of per-example losses of a micro-batch, and sums for the step's metrics (detached
    tensors: they are read once per step, in _reduce_sums, not synchronised per micro-batch)."""
    loss = tcfg["loss"]
    paired = loss in PAIRED_LOSSES
    sequences = [b["chosen"] for b in batch] + [b["rejected"] for b in batch] if paired else \
        [b["completion"] for b in batch]
    tensors = collate(sequences, pad_id, device)  # chosen and rejected in one forward pass
    logps, lengths = completion_logps(model, **tensors)
    sums = {"tokens": sum(len(s.input_ids) for s in sequences), "positions": tensors["attention_mask"].numel()}
    if paired:
        n = len(batch)
        per_example, chosen_r, rejected_r = paired_objective(
            tcfg, logps[:n], logps[n:], _values(batch, "reference_chosen", device),
            _values(batch, "reference_rejected", device), lengths[:n], lengths[n:])
        sums.update(reward_chosen=chosen_r.sum().detach(), reward_rejected=rejected_r.sum().detach(),
                    accuracy=(chosen_r > rejected_r).float().sum().detach(),
                    logp_chosen=logps[:n].detach().sum(), logp_rejected=logps[n:].detach().sum())
    elif loss == "kto":
        desirable = torch.tensor([b["desirable"] for b in batch], device=device)
        kcfg = tcfg["kto"]
        per_example, rewards = losses.kto_loss(logps, _values(batch, "reference", device), desirable, kl,
                                               tcfg["beta"], kcfg["desirable_weight"], kcfg["undesirable_weight"])
        sums.update(reward_desirable=rewards[desirable].sum().detach(),
                    reward_undesirable=rewards[~desirable].sum().detach(), desirable=desirable.sum().detach())
    elif loss == "sft":
        per_example, mean_logps = losses.sft_loss(logps, lengths)
        sums.update(logp_per_token=mean_logps.sum().detach())
    else:  # grpo
        gcfg = tcfg["grpo"]
        advantages = _values(batch, "advantage", device)
        per_example, kl_terms, ratios = losses.grpo_loss(
            logps, _values(batch, "old", device), _values(batch, "reference", device), lengths, advantages,
            gcfg["clip_epsilon"], gcfg["kl_weight"])
        clipped = ((ratios > 1 + gcfg["clip_epsilon"]) & (advantages > 0)) | \
            ((ratios < 1 - gcfg["clip_epsilon"]) & (advantages < 0))
        sums.update(kl=kl_terms.sum().detach(), ratio=ratios.sum().detach(), clip_fraction=clipped.float().sum().detach())
    return per_example.sum(), sums


def _reduce_sums(accelerator, sums: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Sum the step's metric sums over processes (one collective per step)."""
    keys = sorted(sums)
    packed = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=accelerator.device) for k in keys])
    return dict(zip(keys, accelerator.reduce(packed, "sum").tolist(), strict=True))


def _step_means(sums: dict[str, float], n: int) -> dict[str, float]:
    """Per-example means for the metrics line; KTO rewards are averaged within their label."""
    out = {"loss": sums["loss"] / n}
    if "reward_chosen" in sums:
        out.update({k: sums[k] / n for k in ("reward_chosen", "reward_rejected", "accuracy",
                                             "logp_chosen", "logp_rejected")})
        out["margin"] = out["reward_chosen"] - out["reward_rejected"]
    elif "desirable" in sums:
        n_desirable = sums["desirable"]
        out.update(
            reward_desirable=sums["reward_desirable"] / n_desirable if n_desirable else float("nan"),
            reward_undesirable=sums["reward_undesirable"] / (n - n_desirable) if n > n_desirable else float("nan"),
            desirable_fraction=n_desirable / n,
        )
    else:
        out.update({k: sums[k] / n for k in ("logp_per_token", "kl", "ratio", "clip_fraction") if k in sums})
    out["tokens"] = int(sums["tokens"])
    out["padding"] = 1 - sums["tokens"] / sums["positions"]
    return out


@torch.no_grad()
def _kto_reference_point(accelerator, model, chunks: list[tuple[list[dict], float]], pad_id: int) -> torch.Tensor:
    """KTO's z: mean over the global batch of log pi - log ref on the mismatched pairs."""
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for chunk, weight in chunks:
        logps, _ = completion_logps(model, **collate([b["kl"] for b in chunk], pad_id, accelerator.device))
        ref = torch.tensor([b["reference_kl"] for b in chunk], dtype=torch.float64, device=accelerator.device)
        total[0] += weight * (logps.double() - ref).sum()
        total[1] += weight * len(chunk)
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1].clamp(min=1)).float()


def _log_step(round_n: int, row: dict) -> None:
    details = {key: row[key] for key in ("margin", "accuracy", "kl", "reward_desirable", "logp_per_token",
                                         "clip_fraction") if key in row}
    log.info("round %d step %d loss %.4f lr %.3g grad_norm %.3f %s", round_n, row["step"], row["loss"], row["lr"],
             row["grad_norm"], " ".join(f"{key} {value:.4f}" for key, value in details.items()))


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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
    from tqdm import tqdm

    tcfg = config["training"]
    accelerator = make_accelerator(tcfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.manual_seed(round_seed(config, round_n))

    tokenizer = load_tokenizer(init_checkpoint, config["policy"]["trust_remote_code"])
    model = load_causal_lm(init_checkpoint, config["policy"]["trust_remote_code"])
    if tcfg["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
    reference = None
    if uses_reference(tcfg):
        if not reference_paths:
            raise UserError(f"training.loss={tcfg['loss']!r} needs reference log-probs (--reference), found none")
        reference = _Lookup(load_reference_logps(reference_paths), reference_paths)
    elif reference_paths:
        log.warning("training.loss=%r is reference-free: the reference tables %s are not used", tcfg["loss"],
                    [str(p) for p in reference_paths])
    examples, truncation = build_examples(feedback_paths, config, tokenizer, reference)

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=tcfg["lr"], betas=tuple(tcfg["adam_betas"]), eps=tcfg["adam_eps"],
        weight_decay=tcfg["weight_decay"],
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tcfg["schedule"], tcfg["warmup_steps"], estimated_total_steps(config))
    )
    parameter_names = [name for name, _ in model.named_parameters()]  # the optimizer's order
    model, prepared_optimizer = accelerator.prepare(model, optimizer)
    # after prepare, so that FSDP shards the loaded state like the parameters
    previous, resumed = load_training_state(init_checkpoint, optimizer, scheduler, model, parameter_names)
    global_step = previous.get("global_step", 0)
    examples_seen = previous.get("examples_seen", 0)
    if resumed:
        log.info("round %d: resumed optimizer and scheduler at global step %d (lr %.3g)",
                 round_n, global_step, scheduler.get_last_lr()[0])
    else:
        log.info("round %d: %s has no optimizer state; starting a fresh optimizer", round_n, init_checkpoint)
    device, pad_id = accelerator.device, tokenizer.pad_token_id
    batch_size, micro = tcfg["batch_size"], tcfg["micro_batch_size"]

    if tcfg["loss"] == "grpo" and examples:
        # The old policy of GRPO's ratio is the one that sampled this round: the policy
        # as it starts the round, scored once before the first update.
        with accelerator.autocast():
            old, _ = batched_completion_logps(model, [e["completion"] for e in examples], pad_id, 2 * micro, device,
                                              progress="old policy", rank=rank, world=world)
        for example, logp in zip(examples, old.tolist(), strict=True):
            example["old"] = logp
        flat = sum(e["advantage"] == 0 for e in examples)
        if flat:
            log.info("round %d: %d of %d completions have advantage 0 (a group of equal rewards)",
                     round_n, flat, len(examples))
    model.train()

    lengths = [example_length(e) for e in examples]
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total_steps = steps_per_epoch * tcfg["epochs"]
    if not examples:
        log.warning("round %d: the feedback has no trainable items; the policy is carried over unchanged", round_n)
    log.info("round %d: %d examples from %d feedback file(s), %d steps of %d on %d process(es)", round_n,
             len(examples), len(feedback_paths), total_steps, batch_size, world)
    rows: list[dict] = []
    padding = {"tokens": 0, "positions": 0}
    started = previous_step_end = time.monotonic()
    progress = tqdm(total=total_steps, desc=f"train r{round_n}", disable=not accelerator.is_main_process,
                    mininterval=5)
    for epoch in range(tcfg["epochs"]):
        batches = plan_batches(lengths, batch_size, [config["seed"], round_n, epoch], tcfg["group_by_length"])
        for batch_indices in batches:
            global_batch = [examples[i] for i in batch_indices]
            # every process runs the same number of micro-batches; padding ones have weight 0
            chunks = process_chunks(global_batch, rank, world, micro)
            kl = None
            if tcfg["loss"] == "kto":  # under the same autocast as the loss and the reference job
                with accelerator.autocast():
                    kl = _kto_reference_point(accelerator, model, chunks, pad_id)
            step_sums: dict[str, torch.Tensor | float] = {"loss": 0.0}
            for index, (chunk, weight) in enumerate(chunks):
                last = index == len(chunks) - 1
                context = contextlib.nullcontext() if last else accelerator.no_sync(model)
                with context, accelerator.autocast():
                    chunk_loss, chunk_sums = _micro_batch_loss(model, chunk, tcfg, pad_id, device, kl)
                    accelerator.backward(chunk_loss * weight * world / len(global_batch))
                chunk_sums["loss"] = chunk_loss.detach()
                for key, value in chunk_sums.items():
                    step_sums[key] = step_sums.get(key, 0.0) + value * weight
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), tcfg["max_grad_norm"])
            prepared_optimizer.step()
            scheduler.step()
            prepared_optimizer.zero_grad(set_to_none=True)
            global_step += 1
            examples_seen += len(global_batch)

            sums = _reduce_sums(accelerator, step_sums)
            step_end = time.monotonic()
            padding["tokens"] += sums["tokens"]
            padding["positions"] += sums["positions"]
            row = {"round": round_n, "step": global_step, "round_step": global_step - previous.get("global_step", 0),
                   "epoch": epoch, "examples": len(global_batch), "lr": scheduler.get_last_lr()[0],
                   "grad_norm": float(grad_norm), "examples_seen": examples_seen,
                   "seconds": step_end - previous_step_end, **_step_means(sums, len(global_batch))}
            previous_step_end = step_end
            if kl is not None:
                row["kl"] = kl.item()
            rows.append(row)
            progress.update(1)
            if accelerator.is_main_process:
                _log_step(round_n, row)
    progress.close()
    seconds = time.monotonic() - started
    padding["waste"] = 1 - padding["tokens"] / padding["positions"] if padding["positions"] else 0.0
    log.info("round %d: %d tokens in %.1f s (%.0f tokens/s), padding %.1f%% of forward positions", round_n,
             padding["tokens"], seconds, padding["tokens"] / max(seconds, 1e-9), 100 * padding["waste"])

    state = {
        "round": round_n,
        "global_step": global_step,
        "examples_seen": examples_seen,
        "steps_this_round": total_steps,
        "epochs": tcfg["epochs"],
        "lr": scheduler.get_last_lr()[0],
        "world_size": world,
        "config_hash": provenance.base["config_hash"] if provenance else None,
        "feedback_files": [str(p) for p in feedback_paths],
        "truncation": truncation,
        "padding": padding,
        "rng": rng_state(),
    }
    # collectives: every process takes part in gathering the full weights and optimizer state
    full_state_dict = accelerator.get_state_dict(model)
    optimizer_state = optimizer_state_to_save(model, optimizer)
    if accelerator.is_main_process:
        extra = {"round": round_n, "steps": total_steps, "examples": len(examples), "truncation": truncation,
                 "padding": padding}
        record = provenance.record(**extra) if provenance else None
        # The checkpoint first: a train_r{n}.jsonl on disk means ckpt_r{n}/FINAL is complete.
        save_checkpoint(
            output_checkpoint,
            accelerator.unwrap_model(model),
            tokenizer,
            state,
            optimizer_state=optimizer_state,
            scheduler_state=scheduler.state_dict(),
            provenance=record,
            state_dict=full_state_dict,
        )
        write_jsonl(rows, metrics_path, record)
        tracking.log_train_steps(config, rows)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return state

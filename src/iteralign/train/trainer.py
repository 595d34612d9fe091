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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iteralign import tracking
from iteralign.artifacts import write_jsonl
from iteralign.config import old_policy_job, reference_in_train_job, round_seed
from iteralign.errors import UserError
from iteralign.feedback import check_trainable, load_feedback
from iteralign.logps import batched_completion_logps, completion_logps, packed_completion_logps
from iteralign.modeling import load_causal_lm, load_tokenizer
from iteralign.reference import ReferenceLogps
from iteralign.tokens import collate, collate_packed, process_chunks
from iteralign.train.checkpoint import (
    load_training_state,
    optimizer_state_to_save,
    rng_state,
    save_checkpoint,
)
from iteralign.train.data import REFERENCE_FIELDS, CountingEncoder, example_length, plan_batches
from iteralign.train.lora import attach_adapter
from iteralign.train.objectives import Objective, objective_of
from iteralign.train.processes import make_accelerator
from iteralign.train.schedule import estimated_total_steps, lr_lambda

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- data
def _no_reference(prompt_id: str, completion: str) -> None:
    """The reference log-prob of a reference-free loss's sequence: none."""
    return None


def build_examples(feedback_paths: list[str | Path], config: dict, tokenizer,
                   reference: ReferenceLogps | None) -> tuple[list[dict], dict]:
    """Token ids (+ reference log-probs, advantages) of every training example, and truncation counts.

    Each feedback file is turned into examples on its own, as its reference job did
    (KTO's KL partners are drawn within a file), by the loss's registry entry.
    ``reference`` is None for reference-free losses.
    """
    tcfg = config["training"]
    objective = objective_of(tcfg)
    encoder = CountingEncoder(tokenizer, tcfg)
    examples = []
    for path in feedback_paths:
        items = load_feedback(path)
        check_trainable(items, tcfg["loss"], path)
        file_examples = objective.examples(items, config["seed"])
        examples.extend(objective.tensors(file_examples, encoder, reference if reference is not None else _no_reference,
                                          tcfg))
    counts = encoder.counts
    if counts["truncated_prompts"]:
        log.warning("%d of %d sequences had their prompt cut to its last training.max_prompt_length=%d tokens",
                    counts["truncated_prompts"], counts["sequences"], tcfg["max_prompt_length"])
    if counts["truncated_completions"]:
        log.warning("%d of %d sequences had their completion cut at training.max_length=%d",
                    counts["truncated_completions"], counts["sequences"], tcfg["max_length"])
    return examples, counts


# ---------------------------------------------------------------- loss of one micro-batch
def _micro_batch_loss(model, batch: list[dict], tcfg: dict, pad_id: int, device, kl: torch.Tensor | None):
    """Sum of per-example losses of a micro-batch, and sums for the step's metrics (detached
    tensors: they are read once per step, in _reduce_sums, not synchronised per micro-batch)."""
    objective = objective_of(tcfg)
    sequences = [b["chosen"] for b in batch] + [b["rejected"] for b in batch] if objective.paired else \
        [b["completion"] for b in batch]
    logps, lengths, positions = _sequence_logps(model, sequences, tcfg["padding_free"], pad_id, device)
    sums = {"tokens": sum(len(s.input_ids) for s in sequences), "positions": positions}
    per_example, objective_sums = objective.objective(batch, logps, lengths, tcfg, device, kl)
    sums.update(objective_sums)
    return per_example.sum(), sums


def _sequence_logps(model, sequences: list, padding_free: bool, pad_id: int, device):
    """Summed completion log-probs and token counts of the sequences, all in one forward pass
    (chosen and rejected together), padded or packed padding-free; and the forward's positions."""
    if padding_free:
        tensors = collate_packed(sequences, pad_id, device)
        logps, lengths = packed_completion_logps(model, **tensors, count=len(sequences))
    else:
        tensors = collate(sequences, pad_id, device)
        logps, lengths = completion_logps(model, **tensors)
    return logps, lengths, tensors["input_ids"].numel()


def _reduce_sums(accelerator, sums: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Sum the step's metric sums over processes (one collective per step)."""
    keys = sorted(sums)
    packed = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=accelerator.device) for k in keys])
    return dict(zip(keys, accelerator.reduce(packed, "sum").tolist(), strict=True))


def _step_means(sums: dict[str, float], n: int, objective: Objective) -> dict[str, float]:
    """Per-example means for the metrics line: the loss, the objective's own metrics, tokens and padding."""
    return {"loss": sums["loss"] / n, **objective.means(sums, n), "tokens": int(sums["tokens"]),
            "padding": 1 - sums["tokens"] / sums["positions"]}


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


# ---------------------------------------------------------------- set-up and resume
@dataclass
class _Round:
    """What the phases of one round share: the prepared model and optimizer, the examples, the counters."""

    config: dict
    round_n: int
    objective: Objective
    accelerator: Any
    tokenizer: Any
    model: Any  # as accelerator.prepare returned it
    optimizer: torch.optim.Optimizer  # the unwrapped optimizer, whose state is saved
    prepared_optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    examples: list[dict]
    truncation: dict
    first_step: int  # global step at the start of the round
    global_step: int
    examples_seen: int

    @property
    def training(self) -> dict:
        return self.config["training"]


def _computed_later(prompt_id: str, completion: str) -> float:
    """A reference log-prob that the train job fills in itself (_score_reference_adapter_off)."""
    return 0.0


def _reference_logps(tcfg: dict, objective: Objective, reference_paths: list[str | Path]):
    """The reference tables the loss needs, or None (with a warning when some were given in vain)."""
    if reference_in_train_job(tcfg):
        if reference_paths:
            log.warning("training.lora.reference is 'adapter_off': the reference tables %s are not used",
                        [str(p) for p in reference_paths])
        return _computed_later
    if objective.needs_reference(tcfg):
        if not reference_paths:
            raise UserError(f"training.loss={tcfg['loss']!r} needs reference log-probs (--reference), found none")
        return ReferenceLogps(reference_paths)
    if reference_paths:
        log.warning("training.loss=%r is reference-free: the reference tables %s are not used", tcfg["loss"],
                    [str(p) for p in reference_paths])
    return None


def _optimizer_and_schedule(model, config: dict):
    """AdamW over the trainable parameters (all of them, or a LoRA adapter's) and its schedule."""
    tcfg = config["training"]
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=tcfg["lr"], betas=tuple(tcfg["adam_betas"]), eps=tcfg["adam_eps"],
        weight_decay=tcfg["weight_decay"],
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tcfg["schedule"], tcfg["warmup_steps"], estimated_total_steps(config))
    )
    return optimizer, scheduler


def _policy_model(config: dict, round_n: int, init_checkpoint: str | Path, base_checkpoint: str | Path | None):
    """The policy of round n-1: the weights of ``init_checkpoint``, or with ``training.lora``
    the base (the SFT model) plus the adapter of ``init_checkpoint``."""
    tcfg, lora = config["training"], config["training"]["lora"]
    if lora and base_checkpoint is None:
        raise UserError("training.lora is set: the train step needs --base (the SFT checkpoint ckpt_r0/FINAL)")
    model = load_causal_lm(base_checkpoint if lora else init_checkpoint, config["policy"]["trust_remote_code"])
    if tcfg["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
        if lora:
            model.enable_input_require_grads()  # the frozen embeddings' output must carry gradients
    return attach_adapter(model, lora, init_checkpoint, round_n) if lora else model


def _start_round(config: dict, round_n: int, feedback_paths: list[str | Path], reference_paths: list[str | Path],
                 init_checkpoint: str | Path, base_checkpoint: str | Path | None = None) -> _Round:
    """Load the policy of round n-1, the round's examples, and the optimizer and scheduler state."""
    tcfg = config["training"]
    objective = objective_of(tcfg)
    accelerator = make_accelerator(tcfg)
    torch.manual_seed(round_seed(config, round_n))
    tokenizer = load_tokenizer(init_checkpoint, config["policy"]["trust_remote_code"])
    if tcfg["lora"] and accelerator.distributed_type == "FSDP":
        raise UserError("training.lora with FSDP: not supported; train LoRA on one process or with DDP "
                        "(training.accelerate_config: configs/accelerate/ddp.yaml), see docs/training.md")
    model = _policy_model(config, round_n, init_checkpoint, base_checkpoint)
    reference = _reference_logps(tcfg, objective, reference_paths)
    examples, truncation = build_examples(feedback_paths, config, tokenizer, reference)
    optimizer, scheduler = _optimizer_and_schedule(model, config)
    parameter_names = [name for name, p in model.named_parameters() if p.requires_grad]  # the optimizer's order
    model, prepared_optimizer = accelerator.prepare(model, optimizer)
    # after prepare, so that FSDP shards the loaded state like the parameters
    previous, resumed = load_training_state(init_checkpoint, optimizer, scheduler, model, parameter_names)
    first_step = previous.get("global_step", 0)
    if resumed:
        log.info("round %d: resumed optimizer and scheduler at global step %d (lr %.3g)",
                 round_n, first_step, scheduler.get_last_lr()[0])
    else:
        log.info("round %d: %s has no optimizer state; starting a fresh optimizer", round_n, init_checkpoint)
    return _Round(config, round_n, objective, accelerator, tokenizer, model, optimizer, prepared_optimizer,
                  scheduler, examples, truncation, first_step, first_step, previous.get("examples_seen", 0))


# ---------------------------------------------------------------- the reference with the adapter off
def _score_reference_adapter_off(run: _Round) -> None:
    """The reference log-probs of every example, from the SFT model that the base with the
    LoRA adapter switched off is, before the first update (training.lora.reference: adapter_off)."""
    slots = [(example, field) for example in run.examples for field in REFERENCE_FIELDS if field in example]
    with run.accelerator.unwrap_model(run.model).disable_adapter():
        logps = _no_grad_logps(run, [example[field] for example, field in slots], "reference (adapter off)")
    for (example, field), logp in zip(slots, logps, strict=True):
        example[REFERENCE_FIELDS[field]] = logp
    log.info("round %d: %d reference log-probs from the SFT model (the adapter switched off)", run.round_n,
             len(slots))


# ---------------------------------------------------------------- GRPO's old policy
def _old_policy_logps(run: _Round, old_policy_paths: list[str | Path]) -> None:
    """The old policy of GRPO's ratio is the checkpoint that sampled this round. On policy
    (sampling.lag 0) that is the policy as it starts the round, scored here once before the
    first update; under a lag it is an older checkpoint, whose log-probs the round's
    old_policy job computed (``old_policy_paths``)."""
    if old_policy_paths:
        lookup = ReferenceLogps(old_policy_paths, column="old_policy_logp")
        for example in run.examples:
            example["old"] = lookup(*example["sequence"])
        log.info("round %d: old-policy log-probs of %d completions from %s", run.round_n, len(run.examples),
                 ", ".join(map(str, old_policy_paths)))
    else:
        _score_old_policy(run)
    flat = sum(e["advantage"] == 0 for e in run.examples)
    if flat:
        log.info("round %d: %d of %d completions have advantage 0 (a group of equal rewards)",
                 run.round_n, flat, len(run.examples))


def _score_old_policy(run: _Round) -> None:
    """The log-probs of the policy as it starts the round."""
    old = _no_grad_logps(run, [e["completion"] for e in run.examples], "old policy")
    for example, logp in zip(run.examples, old, strict=True):
        example["old"] = logp


def _no_grad_logps(run: _Round, sequences: list, progress: str) -> list[float]:
    """Completion log-probs of ``sequences`` under the round's model as it is now, without gradient,
    sharded over the processes, under the same autocast as the loss (and the reference job)."""
    accelerator = run.accelerator
    with accelerator.autocast():
        logps, _ = batched_completion_logps(
            run.model, sequences, run.tokenizer.pad_token_id, 2 * run.training["micro_batch_size"],
            accelerator.device, progress=progress, rank=accelerator.process_index, world=accelerator.num_processes)
    return logps.tolist()


# ---------------------------------------------------------------- one optimizer step
def _optimizer_step(run: _Round, global_batch: list[dict]) -> tuple[dict[str, float], Any, torch.Tensor | None]:
    """Accumulate the gradient of a global batch over this process's micro-batches and step:
    the step's metric sums over all processes, the gradient norm, and KTO's reference point."""
    accelerator, tcfg, model = run.accelerator, run.training, run.model
    world, pad_id = accelerator.num_processes, run.tokenizer.pad_token_id
    # every process runs the same number of micro-batches; padding ones have weight 0
    chunks = process_chunks(global_batch, accelerator.process_index, world, tcfg["micro_batch_size"])
    kl = None
    if run.objective.reference_point:  # under the same autocast as the loss and the reference job
        with accelerator.autocast():
            kl = _kto_reference_point(accelerator, model, chunks, pad_id)
    step_sums: dict[str, torch.Tensor | float] = {"loss": 0.0}
    for index, (chunk, weight) in enumerate(chunks):
        last = index == len(chunks) - 1
        context = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with context, accelerator.autocast():
            chunk_loss, chunk_sums = _micro_batch_loss(model, chunk, tcfg, pad_id, accelerator.device, kl)
            accelerator.backward(chunk_loss * weight * world / len(global_batch))
        chunk_sums["loss"] = chunk_loss.detach()
        for key, value in chunk_sums.items():
            step_sums[key] = step_sums.get(key, 0.0) + value * weight
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), tcfg["max_grad_norm"])
    run.prepared_optimizer.step()
    run.scheduler.step()
    run.prepared_optimizer.zero_grad(set_to_none=True)
    run.global_step += 1
    run.examples_seen += len(global_batch)
    return _reduce_sums(accelerator, step_sums), grad_norm, kl


def _step_row(run: _Round, epoch: int, examples: int, grad_norm, seconds: float, sums: dict[str, float],
              kl: torch.Tensor | None) -> dict:
    """The step's line of train_r{n}.jsonl."""
    row = {"round": run.round_n, "step": run.global_step, "round_step": run.global_step - run.first_step,
           "epoch": epoch, "examples": examples, "lr": run.scheduler.get_last_lr()[0],
           "grad_norm": float(grad_norm), "examples_seen": run.examples_seen,
           "seconds": seconds, **_step_means(sums, examples, run.objective)}
    if kl is not None:
        row["kl"] = kl.item()
    return row


def _train_epochs(run: _Round, feedback_files: int) -> tuple[list[dict], dict, int]:
    """Every optimizer step of the round: the metrics rows, the padding totals, the number of steps."""
    from tqdm import tqdm

    tcfg, round_n, batch_size = run.training, run.round_n, run.training["batch_size"]
    lengths = [example_length(e) for e in run.examples]
    total_steps = math.ceil(len(run.examples) / batch_size) * tcfg["epochs"]
    if not run.examples:
        log.warning("round %d: the feedback has no trainable items; the policy is carried over unchanged", round_n)
    log.info("round %d: %d examples from %d feedback file(s), %d steps of %d on %d process(es)", round_n,
             len(run.examples), feedback_files, total_steps, batch_size, run.accelerator.num_processes)
    rows: list[dict] = []
    padding = {"tokens": 0, "positions": 0}
    started = previous_step_end = time.monotonic()
    progress = tqdm(total=total_steps, desc=f"train r{round_n}", disable=not run.accelerator.is_main_process,
                    mininterval=5)
    for epoch in range(tcfg["epochs"]):
        for batch_indices in plan_batches(lengths, batch_size, [run.config["seed"], round_n, epoch],
                                          tcfg["group_by_length"]):
            global_batch = [run.examples[i] for i in batch_indices]
            sums, grad_norm, kl = _optimizer_step(run, global_batch)
            step_end = time.monotonic()
            padding["tokens"] += sums["tokens"]
            padding["positions"] += sums["positions"]
            rows.append(_step_row(run, epoch, len(global_batch), grad_norm, step_end - previous_step_end, sums, kl))
            previous_step_end = step_end
            progress.update(1)
            if run.accelerator.is_main_process:
                _log_step(round_n, rows[-1])
    progress.close()
    seconds = time.monotonic() - started
    padding["waste"] = 1 - padding["tokens"] / padding["positions"] if padding["positions"] else 0.0
    log.info("round %d: %d tokens in %.1f s (%.0f tokens/s), padding %.1f%% of forward positions", round_n,
             padding["tokens"], seconds, padding["tokens"] / max(seconds, 1e-9), 100 * padding["waste"])
    return rows, padding, total_steps


# ---------------------------------------------------------------- save
def _trainer_state(run: _Round, feedback_paths: list[str | Path], total_steps: int, padding: dict,
                   provenance) -> dict:
    """trainer_state.json of the round's checkpoint."""
    return {
        "round": run.round_n,
        "global_step": run.global_step,
        "examples_seen": run.examples_seen,
        "steps_this_round": total_steps,
        "epochs": run.training["epochs"],
        "lr": run.scheduler.get_last_lr()[0],
        "world_size": run.accelerator.num_processes,
        "config_hash": provenance.base["config_hash"] if provenance else None,
        "feedback_files": [str(p) for p in feedback_paths],
        "truncation": run.truncation,
        "padding": padding,
        "rng": rng_state(),
    }


def _save_round(run: _Round, state: dict, rows: list[dict], output_checkpoint: str | Path,
                metrics_path: str | Path, provenance) -> None:
    """ckpt_r{n}/FINAL, then train_r{n}.jsonl: a metrics file on disk means the checkpoint is complete."""
    accelerator = run.accelerator
    lora = bool(run.training["lora"])
    # collectives: every process takes part in gathering the full weights and optimizer state
    full_state_dict = None if lora else accelerator.get_state_dict(run.model)
    optimizer_state = optimizer_state_to_save(run.model, run.optimizer)
    if accelerator.is_main_process:
        extra = {"round": run.round_n, "steps": state["steps_this_round"], "examples": len(run.examples),
                 "truncation": run.truncation, "padding": state["padding"]}
        record = provenance.record(**extra) if provenance else None
        save_checkpoint(
            output_checkpoint,
            accelerator.unwrap_model(run.model),
            run.tokenizer,
            state,
            optimizer_state=optimizer_state,
            scheduler_state=run.scheduler.state_dict(),
            provenance=record,
            state_dict=full_state_dict,
            adapter=lora,
        )
        write_jsonl(rows, metrics_path, record)
        tracking.log_train_steps(run.config, rows)
    accelerator.wait_for_everyone()
    accelerator.end_training()


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
    base_checkpoint: str | Path | None = None,
    old_policy_paths: list[str | Path] = (),
) -> dict:
    """Train the policy one round on ``feedback_paths``; write ``output_checkpoint`` and
    ``metrics_path``; return the checkpoint's trainer state. ``base_checkpoint``: the SFT
    model under the adapter, with ``training.lora``. ``old_policy_paths``: GRPO's old-policy
    tables when sampling lags (sampling.lag)."""
    if old_policy_job(config) and not old_policy_paths:
        raise UserError(f"training.loss={config['training']['loss']!r} with sampling.lag {config['sampling']['lag']}: "
                        f"the train step needs --old-policy (the old_policy table of round {round_n}: the "
                        "log-probs of the checkpoint that sampled it)")
    run = _start_round(config, round_n, feedback_paths, reference_paths, init_checkpoint, base_checkpoint)
    if reference_in_train_job(run.training) and run.examples:
        _score_reference_adapter_off(run)
    if run.objective.old_policy and run.examples:
        _old_policy_logps(run, list(old_policy_paths))
    run.model.train()
    rows, padding, total_steps = _train_epochs(run, len(feedback_paths))
    state = _trainer_state(run, feedback_paths, total_steps, padding, provenance)
    _save_round(run, state, rows, output_checkpoint, metrics_path, provenance)
    return state

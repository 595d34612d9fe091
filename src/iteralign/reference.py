"""Reference log-probs of every sequence a round trains on, under the SFT model.

Run as its own job so the SFT model is loaded once per round and the training
job never holds a reference model in memory. Rows are keyed by
(prompt_id, completion_key), which is how the trainer looks them up. Under
``accelerate launch`` each process scores its share of the sequences and the
shares are gathered back in input order; only the main process writes.
A loss whose registry entry (``iteralign.train.objectives``) needs no reference
has no such job. :class:`ReferenceLogps` is the table as the trainer reads it.

The old_policy job is the same computation under the checkpoint that sampled the
round, for GRPO's importance ratio when sampling lags (sampling.lag > 0).
"""

from __future__ import annotations

import logging
from pathlib import Path

from iteralign.errors import UserError
from iteralign.tokens import completion_key

log = logging.getLogger(__name__)

REFERENCE_COLUMNS = ["prompt_id", "completion_key", "reference_logp", "num_tokens", "truncated"]


def reference_logps(config: dict, feedback_path: str | Path, checkpoint: str | Path):
    """The reference table of one feedback file (a DataFrame with REFERENCE_COLUMNS), on every process."""
    from iteralign.config import ConfigError, uses_reference

    tcfg = config["training"]
    if not uses_reference(tcfg):
        raise ConfigError(f"training.loss={tcfg['loss']!r} with these settings is reference-free: "
                          "it needs no reference log-probs")
    return completion_logps(config, feedback_path, checkpoint, "reference_logp")


def old_policy_logps(config: dict, feedback_path: str | Path, checkpoint: str | Path):
    """The old-policy table of one feedback file, under the checkpoint that sampled it
    (REFERENCE_COLUMNS with ``old_policy_logp``), on every process: pi_old of GRPO's importance ratio under sampling.lag."""
    from iteralign.config import ConfigError, old_policy_job

    if not old_policy_job(config):
        raise ConfigError(f"training.loss={config['training']['loss']!r} with sampling.lag "
                          f"{config['sampling']['lag']}: the train job needs no old-policy log-probs")
    return completion_logps(config, feedback_path, checkpoint, "old_policy_logp")


def completion_logps(config: dict, feedback_path: str | Path, checkpoint: str | Path, column: str):
    """Log-probs under ``checkpoint`` of every sequence the loss builds from one feedback file,
    tokenized as the train job tokenizes them, keyed by (prompt_id, completion_key): the table's
    columns are REFERENCE_COLUMNS with the log-prob named ``column``."""
    import pandas as pd

    from iteralign.feedback import check_trainable, load_feedback
    from iteralign.logps import batched_completion_logps
    from iteralign.modeling import load_causal_lm, load_tokenizer
    from iteralign.tokens import PromptRenderer, encode
    from iteralign.train.data import training_sequences
    from iteralign.train.objectives import training_examples
    from iteralign.train.processes import make_accelerator

    tcfg = config["training"]
    items = load_feedback(feedback_path)
    check_trainable(items, tcfg["loss"], feedback_path)
    sequences = training_sequences(training_examples(items, tcfg["loss"], config["seed"]))
    trust = config["policy"]["trust_remote_code"]
    tokenizer = load_tokenizer(checkpoint, trust)
    render = PromptRenderer(tokenizer)
    encoded = [
        encode(tokenizer, render(pid, prompt), completion, tcfg["max_length"], tcfg["max_prompt_length"])
        for pid, prompt, completion in sequences
    ]
    truncated = [e.truncated_prompt or e.truncated_completion for e in encoded]
    if any(truncated):
        log.warning("%d of %d sequences were truncated to training.max_prompt_length=%d / max_length=%d "
                    "(column `truncated`)", sum(truncated), len(encoded), tcfg["max_prompt_length"],
                    tcfg["max_length"])
    if encoded:
        accelerator = make_accelerator(tcfg)
        # float32 weights under the trainer's autocast: at the first step of round 1 the
        # policy's log-probs equal these exactly
        model = load_causal_lm(checkpoint, trust, device=accelerator.device)
        with accelerator.autocast():
            logps, counts = batched_completion_logps(
                model, encoded, tokenizer.pad_token_id, 2 * tcfg["micro_batch_size"], accelerator.device,
                progress=column.removesuffix("_logp"), rank=accelerator.process_index, world=accelerator.num_processes,
            )
    else:
        log.warning("%s has no items; writing an empty table", feedback_path)
        logps, counts = [], []
    return pd.DataFrame({
        "prompt_id": [s[0] for s in sequences],
        "completion_key": [completion_key(s[2]) for s in sequences],
        column: pd.array(logps, dtype="float64"),
        "num_tokens": pd.array(counts, dtype="int64"),
        "truncated": truncated,
    }, columns=[column if c == "reference_logp" else c for c in REFERENCE_COLUMNS])


def load_reference_logps(paths: list[str | Path], column: str = "reference_logp") -> dict[tuple[str, str], float]:
    """``(prompt_id, completion_key) -> column`` over the tables at ``paths``."""
    from iteralign.artifacts import check_columns, read_parquet

    table: dict[tuple[str, str], float] = {}
    for path in paths:
        frame = read_parquet(path)
        check_columns(frame, ["prompt_id", "completion_key", column], path)
        table.update(zip(zip(frame.prompt_id, frame.completion_key, strict=True), frame[column].astype(float),
                         strict=True))
    return table


class ReferenceLogps:
    """The log-prob of a (prompt_id, completion) from the round's reference tables (or, with
    ``column="old_policy_logp"``, from its old-policy tables)."""

    def __init__(self, paths: list[str | Path], column: str = "reference_logp"):
        self.table, self.sources = load_reference_logps(paths, column), [str(s) for s in paths]
        self.step = column.removesuffix("_logp")

    def __call__(self, prompt_id: str, completion: str) -> float:
        key = (prompt_id, completion_key(completion))
        if key not in self.table:
            raise UserError(
                f"{', '.join(self.sources)}: no {self.step.replace('_', '-')} log-prob for prompt_id {prompt_id} "
                f"completion {completion!r:.60}; expected one for every feedback completion",
                hint=f"re-run the {self.step} step on this round's feedback file",
            )
        return self.table[key]

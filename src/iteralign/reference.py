"""Reference log-probs of every sequence a round trains on, under the SFT model.

Run as its own job so the SFT model is loaded once per round and the training
job never holds a reference model in memory. Rows are keyed by
(prompt_id, completion_key), which is how the trainer looks them up.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

REFERENCE_COLUMNS = ["prompt_id", "completion_key", "reference_logp", "num_tokens", "truncated"]


def reference_logps(config: dict, feedback_path: str | Path, checkpoint: str | Path):
    import pandas as pd
    import torch

    from iteralign.feedback import check_trainable, load_feedback
    from iteralign.modeling import load_causal_lm, load_tokenizer
    from iteralign.train.data import PromptRenderer, completion_key, encode, training_sequences
    from iteralign.train.logps import batched_completion_logps

    tcfg = config["training"]
    items = load_feedback(feedback_path)
    check_trainable(items, tcfg["loss"], feedback_path)
    sequences = training_sequences(items, tcfg["loss"], config["seed"])
    trust = config["policy"]["trust_remote_code"]
    device = torch.device("cuda") if tcfg["gpus"] > 0 and torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if tcfg["mixed_precision"] == "bf16" and device.type == "cuda" else torch.float32
    tokenizer = load_tokenizer(checkpoint, trust)
    render = PromptRenderer(tokenizer)
    encoded = [
        encode(tokenizer, render(pid, prompt), completion, tcfg["max_length"], tcfg["max_prompt_length"])
        for pid, prompt, completion in sequences
    ]
    if encoded:
        model = load_causal_lm(checkpoint, trust, dtype=dtype, device=device)
        logps, counts = batched_completion_logps(
            model, encoded, tokenizer.pad_token_id, 2 * tcfg["micro_batch_size"], device, progress="reference"
        )
    else:
        log.warning("%s has no items; writing an empty reference table", feedback_path)
        logps, counts = [], []
    return pd.DataFrame({
        "prompt_id": [s[0] for s in sequences],
        "completion_key": [completion_key(s[2]) for s in sequences],
        "reference_logp": pd.array(logps, dtype="float64"),
        "num_tokens": pd.array(counts, dtype="int64"),
        "truncated": [e.truncated_prompt or e.truncated_completion for e in encoded],
    }, columns=REFERENCE_COLUMNS)

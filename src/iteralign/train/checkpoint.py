"""Policy checkpoints: a plain Hugging Face folder plus optimizer/scheduler state.

``ckpt_r{n}/FINAL`` loads with ``from_pretrained`` (and vLLM) as it is. Beside the
weights: ``optimizer.pt`` and ``scheduler.pt`` (read back with
``weights_only=True``) and ``trainer_state.json``. The folder is built under a
temporary name and renamed when complete (:func:`iteralign.artifacts.atomic_dir`).
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import numpy as np
import torch

from iteralign.artifacts import atomic_dir

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "trainer_state.json"


def rng_state() -> dict:
    """Python, numpy and torch RNG states in JSON-friendly form."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "cuda": [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available()
        else [],
    }


def set_rng_state(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))


def save_checkpoint(
    path: str | Path,
    model,
    tokenizer,
    trainer_state: dict,
    optimizer_state: dict | None = None,
    scheduler_state: dict | None = None,
    provenance: dict | None = None,
    state_dict: dict | None = None,
) -> None:
    """Write a complete checkpoint folder atomically.

    ``state_dict``: a full (gathered) state dict to save instead of the model's own,
    as FSDP needs; ``None`` saves ``model.state_dict()``.
    """
    with atomic_dir(path, provenance) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        if scheduler_state is not None:
            torch.save(scheduler_state, tmp / SCHEDULER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")


def read_trainer_state(path: str | Path) -> dict:
    file = Path(path) / STATE_FILE
    if not file.exists():
        return {}
    return json.loads(file.read_text())


def load_training_state(path: str | Path, optimizer, scheduler) -> tuple[dict, bool]:
    """Load optimizer and scheduler state saved with a checkpoint, when it has them.

    Returns the checkpoint's trainer_state and whether optimizer/scheduler state
    was loaded (not for an SFT checkpoint: round 1 starts a fresh optimizer).
    """
    path = Path(path)
    state = read_trainer_state(path)
    optimizer_file, scheduler_file = path / OPTIMIZER_FILE, path / SCHEDULER_FILE
    if optimizer_file.exists() != scheduler_file.exists():
        raise FileNotFoundError(
            f"{path}: has {OPTIMIZER_FILE if optimizer_file.exists() else SCHEDULER_FILE} but not the other; "
            "a resumable checkpoint needs both"
        )
    if optimizer_file.exists():
        saved = torch.load(optimizer_file, map_location="cpu", weights_only=True)
        saved_groups, groups = saved["param_groups"], optimizer.state_dict()["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in groups]:
            raise ValueError(
                f"{optimizer_file}: parameter groups of sizes {[len(g['params']) for g in saved_groups]} "
                f"do not match the model's {[len(g['params']) for g in groups]}"
            )
        optimizer.load_state_dict(saved)
        scheduler.load_state_dict(torch.load(scheduler_file, map_location="cpu", weights_only=True))
    return state, optimizer_file.exists()

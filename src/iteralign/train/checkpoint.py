"""Policy checkpoints: a plain Hugging Face folder plus optimizer/scheduler state.

``ckpt_r{n}/FINAL`` loads with ``from_pretrained`` (and vLLM) as it is. Beside the
weights: ``optimizer.pt`` and ``scheduler.pt`` (read back with
``weights_only=True``) and ``trainer_state.json``. The folder is built under a
temporary name and renamed when complete (:func:`iteralign.artifacts.atomic_dir`).
With ``training.lora`` the weights are the merged model, beside them ``adapter/``
(peft's adapter_model.safetensors and adapter_config.json), and the optimizer state
is the adapter parameters' (:mod:`iteralign.train.lora`).

Weights and optimizer state are always saved whole (gathered from FSDP shards)
and the optimizer state keyed by parameter index, as ``torch.optim`` writes it:
a checkpoint written by N processes under FSDP resumes on 1 process, and back.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import numpy as np
import torch

from iteralign.artifacts import atomic_dir
from iteralign.errors import UserError

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


def save_checkpoint(
    path: str | Path,
    model,
    tokenizer,
    trainer_state: dict,
    optimizer_state: dict | None = None,
    scheduler_state: dict | None = None,
    provenance: dict | None = None,
    state_dict: dict | None = None,
    adapter: bool = False,
) -> None:
    """Write a complete checkpoint folder atomically.

    ``state_dict``: a full (gathered) state dict to save instead of the model's own,
    as FSDP needs; ``None`` saves ``model.state_dict()``. ``adapter``: ``model`` is a
    peft model, saved as its adapter (``adapter/``) and the merged weights.
    """
    with atomic_dir(path, provenance) as tmp:
        if adapter:
            from iteralign.train.lora import save_adapter_and_merge

            model = save_adapter_and_merge(model, tmp)
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
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise damaged(file, f"not valid JSON ({exc})") from None


def damaged(file: Path, what: str) -> UserError:
    """The error for a checkpoint file that cannot be read: names it and says how to get it back."""
    return UserError(f"{file}: damaged checkpoint file: {what}",
                     hint=f"re-create {file.parent} by re-running the step that wrote it "
                     "(snakemake --forcerun <that folder>) or restore it from a copy")


def load_torch_file(file: Path):
    """``torch.load(weights_only=True)``; a file that does not unpickle is reported as damaged.

    torch's own message for such a file suggests ``weights_only=False``, which would run
    whatever the file holds: the message here names the file instead.
    """
    import pickle

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError) as exc:
        reason = type(exc).__name__ if "weights_only" in str(exc) else f"{type(exc).__name__}: {str(exc)[:120]}"
        raise damaged(file, f"torch.load (weights_only=True) failed with {reason}") from None


def optimizer_state_to_save(model, optimizer) -> dict:
    """The whole optimizer state, keyed by parameter index; call it on every process.

    Works for a plain, DDP or FSDP-wrapped ``model`` (``torch.distributed.checkpoint``
    gathers FSDP shards to the main process on CPU); other processes get ``{}``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not optimizer.state:  # nothing trained yet: no moments to gather
        return optimizer.state_dict()
    by_name = get_optimizer_state_dict(model, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not by_name:
        return {}
    names = [name for group in by_name["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in by_name["param_groups"]],
    }


def _load_optimizer_state(model, optimizer, saved: dict, parameter_names: list[str]) -> None:
    """Load a whole, index-keyed optimizer state into a (possibly FSDP-sharded) optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not saved["state"]:
        optimizer.load_state_dict(saved)  # hyperparameters only
        return
    if parameter_names is None:
        raise ValueError("loading optimizer state into a wrapped model needs its parameter names")
    by_name = {
        "state": {parameter_names[i]: value for i, value in saved["state"].items()},
        "param_groups": [{**group, "params": [parameter_names[i] for i in group["params"]]}
                         for group in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def load_training_state(path: str | Path, optimizer, scheduler, model=None,
                        parameter_names: list[str] | None = None) -> tuple[dict, bool]:
    """Load optimizer and scheduler state saved with a checkpoint, when it has them.

    ``model`` (possibly wrapped by DDP/FSDP, the optimizer built on its parameters)
    and ``parameter_names`` (its ``named_parameters()`` names before wrapping, in the
    optimizer's order) load the state into a sharded optimizer; without them the
    state is loaded with ``optimizer.load_state_dict``.

    Returns the checkpoint's trainer_state and whether optimizer/scheduler state
    was loaded (not for an SFT checkpoint: round 1 starts a fresh optimizer).
    """
    path = Path(path)
    state = read_trainer_state(path)
    optimizer_file, scheduler_file = path / OPTIMIZER_FILE, path / SCHEDULER_FILE
    if optimizer_file.exists() != scheduler_file.exists():
        raise UserError(
            f"{path}: has {OPTIMIZER_FILE if optimizer_file.exists() else SCHEDULER_FILE} but not "
            f"{SCHEDULER_FILE if optimizer_file.exists() else OPTIMIZER_FILE}; a resumable checkpoint needs both",
            hint=f"re-create {path} by re-running the step that wrote it, or restore it from a copy",
        )
    if optimizer_file.exists():
        saved = load_torch_file(optimizer_file)
        if not isinstance(saved, dict) or not {"state", "param_groups"} <= set(saved):
            raise damaged(optimizer_file, f"found {type(saved).__name__}; expected an optimizer state dict")
        saved_groups, groups = saved["param_groups"], optimizer.state_dict()["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in groups]:
            raise UserError(
                f"{optimizer_file}: parameter groups of sizes {[len(g['params']) for g in saved_groups]} "
                f"do not match the model's {[len(g['params']) for g in groups]}"
            )
        if model is None:
            optimizer.load_state_dict(saved)
        else:
            _load_optimizer_state(model, optimizer, saved, parameter_names)
        scheduler.load_state_dict(load_torch_file(scheduler_file))
    return state, optimizer_file.exists()

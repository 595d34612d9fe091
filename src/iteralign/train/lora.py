"""LoRA adapters (``training.lora``, the ``peft`` library) over the SFT model.

Round n builds its policy from the base, the SFT model ``ckpt_r0/FINAL``, plus the
adapter saved in ``ckpt_r{n-1}/FINAL/adapter/`` (round 1: a fresh adapter, whose B
matrices are zero, so round 1 starts exactly at the SFT model). Switching the adapter
off gives the SFT model, i.e. the reference, in every round. Only the adapter's
parameters train; the checkpoint holds the merged weights (a plain Hugging Face
folder), the adapter, and the optimizer state of the adapter's parameters.
"""

from __future__ import annotations

import logging
from pathlib import Path

from iteralign.errors import UserError

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # sub-folder of a checkpoint holding peft's adapter files
ADAPTER_CONFIG = "adapter_config.json"


def linear_module_names(model) -> list[str]:
    """The names (last component) of the model's ``nn.Linear`` modules, the output head left out:
    for Llama, Qwen2 or Mistral the q, k, v, o, gate, up and down projections."""
    import torch

    output = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not output}
    return sorted(names)


def lora_config(settings: dict, model):
    """peft's LoraConfig of ``training.lora`` for ``model``."""
    from peft import LoraConfig

    targets = settings["target_modules"] or linear_module_names(model)
    return LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def has_adapter(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / ADAPTER_DIR / ADAPTER_CONFIG).is_file()


def attach_adapter(model, settings: dict, init_checkpoint: str | Path, round_n: int):
    """``model`` (the base) with the adapter of ``init_checkpoint``, trainable, or a fresh one in round 1."""
    from peft import PeftModel, get_peft_model

    if has_adapter(init_checkpoint):
        log.info("round %d: resuming the LoRA adapter of %s", round_n, init_checkpoint)
        return PeftModel.from_pretrained(model, Path(init_checkpoint) / ADAPTER_DIR, is_trainable=True)
    if round_n > 1:
        raise UserError(f"{init_checkpoint}: has no {ADAPTER_DIR}/{ADAPTER_CONFIG}, yet training.lora is set: "
                        "it was trained without LoRA",
                        hint="LoRA rounds continue LoRA rounds: start a new experiment, or unset training.lora")
    try:
        peft_model = get_peft_model(model, lora_config(settings, model))
    except ValueError as exc:  # peft's message for target modules the model does not have
        raise UserError(f"training.lora.target_modules: {str(exc).splitlines()[0][:200]}; "
                        f"expected some of {linear_module_names(model)}") from None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("round %d: fresh LoRA adapter (r=%d) on %s: %d of %d parameters train", round_n, settings["r"],
             ",".join(peft_model.peft_config["default"].target_modules), trainable, total)
    return peft_model


def save_adapter_and_merge(peft_model, folder: Path):
    """Write the adapter to ``folder/adapter`` and return the model with the adapter merged
    into its weights (in place: the round's model is not used after saving)."""
    peft_model.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True)
    return peft_model.merge_and_unload()


def is_adapter_folder(path: str | Path) -> bool:
    """A peft adapter checkpoint (adapter_config.json, no full weights of its own)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> Path:
    """The base model folder an adapter checkpoint names (``base_model_name_or_path``), checked to exist."""
    import json

    file = Path(path) / ADAPTER_CONFIG
    try:
        base = json.loads(file.read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: not valid JSON ({exc})") from None
    if not base or not (Path(base).expanduser() / "config.json").is_file():
        raise UserError(f"{file}: base_model_name_or_path is {base!r}; expected a local Hugging Face "
                        "checkpoint folder (policy.sft_checkpoint as a LoRA adapter is merged into its base)")
    return Path(base).expanduser().resolve()


def merge_adapter_checkpoint(adapter: str | Path, output: Path, trust_remote_code: bool = False) -> None:
    """Save into ``output`` the base model named by ``adapter`` with the adapter merged in, and the
    tokenizer (the adapter folder's own when it has one, else the base's)."""
    from peft import PeftModel

    from iteralign.modeling import load_causal_lm, load_tokenizer

    base = adapter_base(adapter)
    model = PeftModel.from_pretrained(load_causal_lm(base, trust_remote_code), adapter).merge_and_unload()
    tokenizer_source = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else base
    model.save_pretrained(output, safe_serialization=True)
    load_tokenizer(tokenizer_source, trust_remote_code).save_pretrained(output)

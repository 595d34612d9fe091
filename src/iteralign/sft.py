"""The SFT stage: make ``ckpt_r0/FINAL``, the policy of round 0 and the frozen reference.

Either builds a small Llama and character tokenizer locally (``sft.model:
tiny-llama``) or starts from a local checkpoint folder, then fine-tunes it on
(prompt, completion) pairs with the token-mean negative log-likelihood of the
completion. The SFT optimizer state is not carried into round 1: preference
training starts its own optimizer (different learning rate and objective).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def load_sft_examples(config: dict) -> list[tuple[list[dict], str]]:
    scfg = config["sft"]
    source = scfg["data"]
    if source == "demo:addition":
        from iteralign import demo

        return demo.sft_examples(scfg["num_examples"], config["seed"], scfg["carry_forget_prob"])
    from iteralign.prompts import PromptError, canonical_messages, read_source_rows

    prompts = read_source_rows(source, "prompt")
    completions = read_source_rows(source, "completion")
    examples = []
    for (where, prompt), (_, completion) in zip(prompts, completions, strict=True):
        if not isinstance(completion, str) or not completion.strip():
            raise PromptError(f"{where}: completion is {completion!r:.60}; expected non-empty text")
        examples.append((canonical_messages(prompt, where), completion))
    return examples


def _build_model(config: dict, examples):
    scfg = config["sft"]
    if scfg["model"] == "tiny-llama":
        from iteralign.tiny import build_char_tokenizer, build_llama

        alphabet = "".join(sorted({c for msgs, out in examples for m in msgs for c in m["content"]} | set(
            "".join(out for _, out in examples))))
        tokenizer = build_char_tokenizer(alphabet)
        model = build_llama(tokenizer, seed=config["seed"], **scfg["tiny"])
        return model, tokenizer
    from iteralign.modeling import load_causal_lm, load_tokenizer

    trust = config["policy"]["trust_remote_code"]
    return load_causal_lm(scfg["model"], trust), load_tokenizer(scfg["model"], trust)


def run_sft(config: dict, output: str | Path, metrics_path: str | Path, provenance=None) -> dict:
    import torch
    from tqdm import tqdm

    from iteralign.artifacts import write_jsonl
    from iteralign.logps import completion_logps
    from iteralign.modeling import default_device
    from iteralign.tokens import PromptRenderer, collate, encode
    from iteralign.train.checkpoint import save_checkpoint
    from iteralign.train.schedule import lr_lambda

    scfg, tcfg = config["sft"], config["training"]
    examples = load_sft_examples(config)
    model, tokenizer = _build_model(config, examples)
    log.info("sft: %d examples, model with %d parameters", len(examples), sum(p.numel() for p in model.parameters()))
    render = PromptRenderer(tokenizer)
    from iteralign.prompts import prompt_id

    encoded = [encode(tokenizer, render(prompt_id(msgs), msgs), out, tcfg["max_length"], tcfg["max_prompt_length"])
               for msgs, out in examples]
    device = default_device(use_gpu=tcfg["gpus"] > 0)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=scfg["lr"], weight_decay=scfg["weight_decay"])
    steps = scfg["epochs"] * math.ceil(len(encoded) / scfg["batch_size"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("cosine", scfg["warmup_steps"], steps))
    torch.manual_seed(config["seed"])
    rows, step = [], 0
    progress = tqdm(total=steps, desc="sft", mininterval=5)
    for epoch in range(scfg["epochs"]):
        order = np.random.default_rng([config["seed"], epoch]).permutation(len(encoded))
        for start in range(0, len(order), scfg["batch_size"]):
            batch = collate([encoded[i] for i in order[start : start + scfg["batch_size"]]],
                            tokenizer.pad_token_id, device)
            logps, counts = completion_logps(model, **batch)
            loss = -logps.sum() / counts.sum()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            rows.append({"step": step, "epoch": epoch, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                         "grad_norm": float(grad_norm)})
            progress.update(1)
            if step % 50 == 0 or step == steps:
                log.info("sft step %d/%d loss %.4f", step, steps, loss.item())
    progress.close()
    model.eval()
    state = {"round": 0, "global_step": 0, "examples_seen": 0, "sft_steps": step,
             "sft_final_loss": rows[-1]["loss"] if rows else None}
    record = provenance.record(sft_steps=step, examples=len(encoded)) if provenance else None
    save_checkpoint(output, model.cpu(), tokenizer, state, provenance=record)
    write_jsonl(rows, metrics_path, record)  # after the checkpoint, as train writes them
    return state


def link_sft(config: dict, output: str | Path, provenance=None, stamp: str | Path | None = None) -> None:
    """Make ``ckpt_r0/FINAL`` a folder of symbolic links to the files of the user's SFT
    checkpoint (never copied or modified).

    A real folder, not one link: Snakemake keeps its ``.snakemake_timestamp`` in it, so
    touching the user's folder does not make the experiment look out of date; its
    content stamp (``stamp``, iteralign.external) is what re-runs link_sft when the
    content changes. The sidecar's sha256 is the checkpoint's content hash (the
    stamp's, when it records this folder; else hashed here).

    An SFT checkpoint that is a LoRA adapter (adapter_config.json, no config.json) is
    merged into the base model it names: ``ckpt_r0/FINAL`` then holds the merged weights.
    """
    from iteralign.artifacts import atomic_path, dir_sha256, sidecar_path
    from iteralign.external import read_stamp
    from iteralign.train.lora import adapter_base, is_adapter_folder

    source = Path(config["policy"]["sft_checkpoint"]).expanduser().resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"policy.sft_checkpoint {source} does not exist or is not a folder")
    adapter = is_adapter_folder(source) and not (source / "config.json").exists()
    if adapter:
        adapter_base(source)  # names a local base model, or stops here
    if not adapter and not (source / "config.json").exists():
        raise FileNotFoundError(f"policy.sft_checkpoint {source} has no config.json: not a Hugging Face checkpoint")
    if not config["policy"]["trust_remote_code"] and not adapter:
        from iteralign.modeling import check_tokenizer_files

        check_tokenizer_files(source, "policy.sft_checkpoint")
    output = Path(output)
    if output.is_dir() and not output.is_symlink() and not any(output.iterdir()):
        output.rmdir()  # an empty folder made by the workflow engine
    stamped = read_stamp(stamp) if stamp else None
    meta = provenance.record(linked_to=str(source)) if provenance else {"linked_to": str(source)}
    if adapter:  # the merged weights are this folder's own content
        with atomic_path(output, is_dir=True) as folder:
            _merge_adapter(source, folder, config["policy"]["trust_remote_code"])
            meta["sha256"] = dir_sha256(folder)
            _write_meta(sidecar_path(output), meta)
        return
    meta["sha256"] = stamped["sha256"] if stamped and stamped["path"] == str(source) else dir_sha256(source)
    _write_meta(sidecar_path(output), meta)
    with atomic_path(output, is_dir=True) as tmp:
        _link_files(source, tmp)


def _write_meta(path: Path, meta: dict) -> None:
    import json

    from iteralign.artifacts import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _merge_adapter(source: Path, target: Path, trust_remote_code: bool) -> None:
    """An SFT checkpoint that is a LoRA adapter: ckpt_r0/FINAL is its base with it merged in."""
    from iteralign.train.lora import merge_adapter_checkpoint

    log.info("policy.sft_checkpoint %s is a LoRA adapter: merging it into its base", source)
    merge_adapter_checkpoint(source, target, trust_remote_code)


def _link_files(source: Path, target: Path) -> None:
    """Mirror ``source`` under ``target``: real sub-folders, a symbolic link per file."""
    import os

    for entry in sorted(source.iterdir()):
        if entry.is_dir():
            (target / entry.name).mkdir()
            _link_files(entry, target / entry.name)
        else:
            os.symlink(entry, target / entry.name)

"""LoRA adapters (training.lora): only the adapter trains, FINAL is the merged model, the adapter
and its Adam moments carry over, the reference stays the SFT model, every loss runs."""

import json
import re
import shutil

import feedback_data
import numpy as np
import pandas as pd
import pytest
import torch
from feedback_data import nine_pairs, write_feedback
from helpers import accelerate_launch, commands_by_step, micro_config
from safetensors.torch import load_file

from iteralign import config as cfg
from iteralign.artifacts import dir_sha256, write_json, write_parquet
from iteralign.config import ConfigError, uses_reference
from iteralign.feedback import build_pairwise
from iteralign.modeling import load_causal_lm
from iteralign.reference import reference_logps
from iteralign.train.lora import ADAPTER_DIR, linear_module_names
from iteralign.train.trainer import train_round

LORA = {"r": 4, "alpha": 8}
PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
FEEDBACK_OF = {"dpo": "pairwise", "cdpo": "pairwise", "ipo": "pairwise", "slic": "pairwise", "simpo": "pairwise",
               "orpo": "pairwise", "kto": "binary", "sft": "pairwise", "grpo": "scalar"}


def lora_config(lora=None, **training) -> dict:
    settings = {"warmup_steps": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2,
                "lora": {**LORA, **(lora or {})}, **training}
    return cfg.validate(micro_config(training=settings))


def write_round_files(root, config, ckpt0, n):
    items, _ = build_pairwise(feedback_data.crafted_samples(6, outputs=["012", "013", "110", "111"]), "random",
                              0.0, seed=n, round_n=n)
    feedback, reference = root / f"feedback_r{n}.json", root / f"reflogps_r{n}.parquet"
    write_json(items, feedback)
    write_parquet(reference_logps(config, feedback, ckpt0), reference)
    return feedback, reference


@pytest.fixture(scope="module")
def rounds(tmp_path_factory, tiny_checkpoint):
    """Two LoRA rounds of DPO on the tiny model: (config, root, feedback and reference files)."""
    root = tmp_path_factory.mktemp("lora")
    config = lora_config()
    ckpt0 = root / "ckpt_r0" / "FINAL"
    shutil.copytree(tiny_checkpoint, ckpt0)
    files = {n: write_round_files(root, config, ckpt0, n) for n in (1, 2)}
    for n in (1, 2):
        train_round(config, n, [files[n][0]], [files[n][1]], root / f"ckpt_r{n - 1}" / "FINAL",
                    root / f"ckpt_r{n}" / "FINAL", root / f"train_r{n}.jsonl", base_checkpoint=ckpt0)
    return config, root, files


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _base_and_adapter(root, n):
    """The base (ckpt_r0) with the adapter of round n, as peft builds it."""
    from peft import PeftModel

    base = load_causal_lm(root / "ckpt_r0" / "FINAL")
    return PeftModel.from_pretrained(base, root / f"ckpt_r{n}" / "FINAL" / ADAPTER_DIR).eval()


def test_default_targets_are_every_linear_projection_but_the_head(tiny_checkpoint):
    assert linear_module_names(load_causal_lm(tiny_checkpoint)) == PROJECTIONS


def test_checkpoint_holds_the_merged_model_the_adapter_and_its_optimizer_state(rounds):
    from transformers import AutoModelForCausalLM

    _, root, _ = rounds
    final = root / "ckpt_r1" / "FINAL"
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt"} <= {p.name for p in final.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (final / ADAPTER_DIR).iterdir()}
    merged = load_file(final / "model.safetensors")
    assert not any("lora" in key or "base_layer" in key for key in merged)  # a plain model's names
    AutoModelForCausalLM.from_pretrained(final)
    adapter_keys = load_file(final / ADAPTER_DIR / "adapter_model.safetensors")
    saved = torch.load(final / "optimizer.pt", weights_only=True)
    assert len(saved["state"]) == len(adapter_keys) > 0  # moments of the adapter parameters only


def test_only_the_adapter_changes_the_base_weights_stay_bit_identical(rounds):
    _, root, _ = rounds
    sft = load_causal_lm(root / "ckpt_r0" / "FINAL").state_dict()
    model = _base_and_adapter(root, 2)
    base = {name.removeprefix("base_model.model.").replace(".base_layer", ""): value
            for name, value in model.state_dict().items() if "lora_" not in name}
    assert set(base) == set(sft)
    for name, value in sft.items():
        assert torch.equal(base[name], value), name
    lora_b = [v for name, v in model.state_dict().items() if "lora_B" in name]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # the adapter trained (B starts at zero)


def test_merged_final_gives_the_logits_of_base_plus_adapter(rounds):
    _, root, _ = rounds
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 4]])
    with torch.no_grad():
        merged = load_causal_lm(root / "ckpt_r2" / "FINAL")(input_ids=ids).logits
        adapted = _base_and_adapter(root, 2)(input_ids=ids).logits
        sft = load_causal_lm(root / "ckpt_r0" / "FINAL")(input_ids=ids).logits
    assert (merged - sft).abs().max() > 1e-3  # the adapter changed the model
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)  # float32: rounding of W + BA only


def test_round_two_resumes_the_adapter_moments_and_the_schedule(rounds):
    _, root, _ = rounds
    r1, r2 = _rows(root / "train_r1.jsonl"), _rows(root / "train_r2.jsonl")
    assert r2[0]["step"] == len(r1) + 1 and r2[0]["lr"] > r1[0]["lr"]  # warmup not restarted
    saved1 = torch.load(root / "ckpt_r1" / "FINAL" / "optimizer.pt", weights_only=True)["state"]
    saved2 = torch.load(root / "ckpt_r2" / "FINAL" / "optimizer.pt", weights_only=True)["state"]
    assert saved1 and set(saved1) == set(saved2)
    for index in saved1:
        assert int(saved2[index]["step"]) == len(r1) + len(r2)  # one Adam counter over both rounds
    scheduler = torch.load(root / "ckpt_r2" / "FINAL" / "scheduler.pt", weights_only=True)
    assert scheduler["last_epoch"] == len(r1) + len(r2)


def test_round_two_starts_from_round_one_adapter_and_moments_exactly(rounds, tmp_path):
    """Load round 1's checkpoint as round 2 does and compare with what round 1 saved."""
    from iteralign.train.trainer import _start_round

    config, root, files = rounds
    run = _start_round(config, 2, [files[2][0]], [files[2][1]], root / "ckpt_r1" / "FINAL",
                       root / "ckpt_r0" / "FINAL")
    adapter = load_file(root / "ckpt_r1" / "FINAL" / ADAPTER_DIR / "adapter_model.safetensors")
    trainable = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(adapter) > 0
    for name, param in trainable.items():
        assert torch.equal(param.detach(), adapter[name.replace(".default", "")]), name
    saved = torch.load(root / "ckpt_r1" / "FINAL" / "optimizer.pt", weights_only=True)["state"]
    for index, param in enumerate(trainable.values()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(run.optimizer.state[param][key], saved[index][key])
    assert run.first_step == len(_rows(root / "train_r1.jsonl"))


def test_reference_logps_of_a_later_round_equal_the_sft_model(rounds):
    """Round 2's reference table equals the log-probs of round 1's policy with its adapter removed."""
    from iteralign.modeling import load_tokenizer

    config, root, files = rounds
    adapter_off = root / "adapter_off"
    _base_and_adapter(root, 1).unload().save_pretrained(adapter_off)
    load_tokenizer(root / "ckpt_r0" / "FINAL").save_pretrained(adapter_off)
    stored = pd.read_parquet(files[2][1])["reference_logp"].to_numpy()
    policy = reference_logps(config, files[2][0], root / "ckpt_r1" / "FINAL")["reference_logp"].to_numpy()
    assert not np.allclose(stored, policy)  # the policy moved away from the reference
    assert np.array_equal(stored, reference_logps(config, files[2][0], adapter_off)["reference_logp"].to_numpy())


def test_the_provenance_hash_covers_the_adapter(rounds):
    _, root, _ = rounds
    final = root / "ckpt_r2" / "FINAL"
    meta = json.loads((final.parent / "FINAL.meta.json").read_text()) if (final.parent / "FINAL.meta.json").exists() \
        else None
    before = dir_sha256(final)
    adapter_file = final / ADAPTER_DIR / "adapter_config.json"
    original = adapter_file.read_text()
    adapter_file.write_text(original + " ")
    try:
        assert dir_sha256(final) != before
    finally:
        adapter_file.write_text(original)
    assert dir_sha256(final) == before
    assert meta is None or meta["sha256"] == before


def test_adapter_off_reference_in_the_train_job_trains_as_the_reference_job_does(rounds, tmp_path):
    """Round 2 again, its reference log-probs computed by the train job with round 1's adapter
    switched off: the same losses and implicit rewards as with the reference job's table."""
    config, root, files = rounds
    in_job = lora_config({"reference": "adapter_off"})
    assert uses_reference(in_job["training"]) and not cfg.uses_reference_job(in_job["training"])
    train_round(in_job, 2, [files[2][0]], [], root / "ckpt_r1" / "FINAL", tmp_path / "FINAL",
                tmp_path / "train_r2.jsonl", base_checkpoint=root / "ckpt_r0" / "FINAL")
    with_job, without = _rows(root / "train_r2.jsonl"), _rows(tmp_path / "train_r2.jsonl")
    assert len(with_job) == len(without) > 0
    assert abs(with_job[0]["margin"]) > 1e-4  # round 1's adapter moved the policy: the reference matters
    for key in ("loss", "reward_chosen", "reward_rejected", "margin"):
        np.testing.assert_allclose([r[key] for r in without], [r[key] for r in with_job], rtol=1e-4, atol=1e-6)


def test_adapter_off_runs_no_reference_job(tmp_path):
    commands = commands_by_step(tmp_path / "off", training={"lora": {**LORA, "reference": "adapter_off"}})
    assert len(commands["train"]) == 3 and "reference" not in commands
    assert all("--reference" not in command for command in commands["train"])


@pytest.mark.parametrize("loss", sorted(FEEDBACK_OF))
def test_every_loss_runs_a_lora_round_with_gradient_checkpointing(loss, tmp_path, tiny_checkpoint):
    config = cfg.validate(micro_config(feedback={"type": FEEDBACK_OF[loss]}, training={
        "loss": loss, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2, "lora": LORA,
        "gradient_checkpointing": True}))
    path = write_feedback(tmp_path, FEEDBACK_OF[loss])
    references = []
    if uses_reference(config["training"]):
        references = [tmp_path / "reflogps.parquet"]
        write_parquet(reference_logps(config, path, tiny_checkpoint), references[0])
    state = train_round(config, 1, [path], references, tiny_checkpoint, tmp_path / "ckpt_r1" / "FINAL",
                        tmp_path / "train_r1.jsonl", base_checkpoint=tiny_checkpoint)
    rows = _rows(tmp_path / "train_r1.jsonl")
    assert state["global_step"] == len(rows) > 0
    assert all(np.isfinite(row["loss"]) and row["grad_norm"] > 0 for row in rows)
    assert (tmp_path / "ckpt_r1" / "FINAL" / ADAPTER_DIR / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(("lora", "key"), [({"r": 0}, "training.lora.r"), ({"alpha": -1}, "training.lora.alpha"),
                                           ({"dropout": 1.5}, "training.lora.dropout"),
                                           ({"rank": 4}, "training.lora.rank"),
                                           ({"target_modules": []}, "training.lora.target_modules"),
                                           ({"reference": "other"}, "training.lora.reference")])
def test_bad_lora_settings_are_one_line_naming_the_key(lora, key):
    with pytest.raises(ConfigError) as error:
        lora_config(lora)
    assert key in str(error.value).splitlines()[0]


def test_unknown_target_modules_name_the_key(tmp_path, tiny_checkpoint):
    from iteralign.errors import UserError

    config = lora_config({"target_modules": ["query_key_value"]})
    path = write_feedback(tmp_path, "pairwise")
    reference = tmp_path / "reflogps.parquet"
    write_parquet(reference_logps(config, path, tiny_checkpoint), reference)
    with pytest.raises(UserError, match=r"training\.lora\.target_modules.*q_proj"):
        train_round(config, 1, [path], [reference], tiny_checkpoint, tmp_path / "out", tmp_path / "m.jsonl",
                    base_checkpoint=tiny_checkpoint)
    assert not (tmp_path / "out").exists()


def test_full_fine_tuning_config_hash_is_unchanged_by_the_lora_key():
    config = cfg.validate(micro_config())
    assert config["training"]["lora"] is None
    without = {**config, "training": {k: v for k, v in config["training"].items() if k != "lora"}}
    assert cfg.config_hash(config) == cfg.config_hash(without)
    assert cfg.config_hash(lora_config()) != cfg.config_hash(config)


def test_two_processes_train_the_adapter_one_process_trains(tmp_path, tiny_checkpoint):
    import yaml

    write_json(nine_pairs(), tmp_path / "feedback_r1.json")
    raw = micro_config(training={"batch_size": 4, "micro_batch_size": 1, "lr": 1e-2, "warmup_steps": 0,
                                 "lora": LORA, "gradient_checkpointing": True})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    config = cfg.validate(raw)
    write_parquet(reference_logps(config, tmp_path / "feedback_r1.json", tiny_checkpoint), tmp_path / "ref.parquet")
    train_round(config, 1, [tmp_path / "feedback_r1.json"], [tmp_path / "ref.parquet"], tiny_checkpoint,
                tmp_path / "ckpt_1proc/FINAL", tmp_path / "train_1proc.jsonl", base_checkpoint=tiny_checkpoint)
    accelerate_launch("train", "--config", "config.yaml", "--round", "1", "--feedback", "feedback_r1.json",
                      "--reference", "ref.parquet", "--checkpoint", str(tiny_checkpoint), "--base",
                      str(tiny_checkpoint), "--output", "ckpt_2proc/FINAL", "--metrics", "train_2proc.jsonl",
                      cwd=tmp_path)
    one, two = (_rows(tmp_path / f"train_{n}proc.jsonl") for n in (1, 2))
    assert len(one) == len(two) == 3
    assert [row["loss"] for row in two] == pytest.approx([row["loss"] for row in one], rel=1e-5, abs=1e-6)
    for file in (f"{ADAPTER_DIR}/adapter_model.safetensors", "model.safetensors"):
        a, b = (load_file(tmp_path / f"ckpt_{n}proc/FINAL" / file) for n in (1, 2))
        assert a.keys() == b.keys() and a
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, file


def test_an_sft_checkpoint_that_is_a_lora_adapter_is_merged_into_its_base(tmp_path, tiny_checkpoint):
    from peft import LoraConfig, get_peft_model

    from iteralign.artifacts import read_provenance
    from iteralign.sft import link_sft

    model = get_peft_model(load_causal_lm(tiny_checkpoint), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_()  # a trained adapter (B starts at zero)
    adapter = tmp_path / "sft_adapter"
    model.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_checkpoint)
    config = cfg.validate(micro_config(policy={"sft_checkpoint": str(adapter)}))
    output = tmp_path / "ckpt_r0" / "FINAL"
    link_sft(config, output)
    assert not any(p.is_symlink() for p in output.iterdir())  # written, not linked
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 4]])
    with torch.no_grad():
        merged = load_causal_lm(output)(input_ids=ids).logits
        expected = model.eval()(input_ids=ids).logits
        base = load_causal_lm(tiny_checkpoint)(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    assert (output / "tokenizer.json").is_file()
    assert read_provenance(output)["sha256"] == dir_sha256(output)


def test_an_adapter_whose_base_is_not_a_local_checkpoint_is_one_line(tmp_path):
    from iteralign.errors import UserError
    from iteralign.sft import link_sft

    adapter = tmp_path / "sft_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "meta-llama/Llama-3-8B"}))
    config = cfg.validate(micro_config(policy={"sft_checkpoint": str(adapter)}))
    with pytest.raises(UserError, match="base_model_name_or_path is 'meta-llama/Llama-3-8B'"):
        link_sft(config, tmp_path / "ckpt_r0" / "FINAL")
    assert not (tmp_path / "ckpt_r0").exists() or not any((tmp_path / "ckpt_r0").iterdir())


@pytest.mark.workflow
def test_lora_train_jobs_read_the_sft_checkpoint_as_base_and_several_gpus_use_ddp(tmp_path):
    commands = commands_by_step(tmp_path / "lora", training={"lora": LORA, "gpus": 2})
    assert len(commands["train"]) == 3 and len(commands["reference"]) == 3  # the reference job stays
    for command in commands["train"]:
        assert re.search(r"--base \S+/ckpt_r0/FINAL --checkpoint \S+/ckpt_r\d/FINAL", command), command
        assert "configs/accelerate/ddp.yaml" in command
    full = commands_by_step(tmp_path / "full")
    assert all("--base" not in command for command in full["train"])


# ---------------------------------------------------------------- the workflow with LoRA
WORKFLOW_TRAINING = {"lr": 1e-3, "lora": {"r": 8, "alpha": 16}}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from helpers import new_workdir, snakemake

    workdir = new_workdir(tmp_path_factory.mktemp("lora_wf") / "run", rounds=2, training=WORKFLOW_TRAINING)
    snakemake(workdir)
    return workdir


@pytest.mark.workflow
def test_a_lora_workflow_runs_end_to_end_and_passes_a_deep_audit(lora_run):
    from helpers import EXP, run_cli

    exp = lora_run / EXP
    for n in (1, 2):
        assert (exp / f"ckpt_r{n}/FINAL" / ADAPTER_DIR / "adapter_model.safetensors").is_file()
        assert json.loads((exp / f"ckpt_r{n}/FINAL.meta.json").read_text())["sha256"] == dir_sha256(
            exp / f"ckpt_r{n}/FINAL")
    assert all((exp / f"eval_r{n}.json").is_file() for n in range(3))
    done = run_cli("audit", str(EXP), "--deep", "--strict", cwd=lora_run, check=False)
    assert done.returncode == 0, done.stdout[-3000:]


@pytest.mark.workflow
def test_the_last_good_store_keeps_and_restores_the_adapter(lora_run, tmp_path):
    from helpers import EXP, copy_run

    from iteralign.last_good import keep_last_good, restore

    exp = copy_run(lora_run, tmp_path / "copy") / EXP
    final = exp / "ckpt_r2/FINAL"
    before = dir_sha256(final)
    keep_last_good(exp)
    shutil.rmtree(final)  # what a failed re-run of round 2 leaves
    assert "ckpt_r2/FINAL" in restore(exp)
    assert (final / ADAPTER_DIR / "adapter_model.safetensors").is_file() and dir_sha256(final) == before


@pytest.mark.workflow
def test_the_held_out_reward_rises_from_round_0_to_the_last_lora_round(lora_run):
    from helpers import EXP

    first, last = (json.loads((lora_run / EXP / f"eval_r{n}.json").read_text()) for n in (0, 2))
    assert last["mean_reward"] > first["mean_reward"]
    assert last["win_rate_vs_r0"] > 0.5
    assert last["kl_to_reference"] > 0  # the adapter moved the policy away from the SFT model

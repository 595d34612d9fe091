"""The trainer: state carried across rounds, the reference fixed at SFT, KTO's KL partners."""

import json
import shutil

import feedback_data
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import micro_config

from iteralign import config as cfg
from iteralign.artifacts import write_json, write_parquet
from iteralign.feedback import build_binary, build_pairwise, load_feedback
from iteralign.reference import reference_logps
from iteralign.train.checkpoint import load_training_state
from iteralign.train.data import assign_kl_partners, unpaired_from_feedback
from iteralign.train.schedule import lr_lambda
from iteralign.train.trainer import train_round

OUTPUTS = ["012", "013", "110", "111"]  # all of 3 characters


def crafted_samples(n_prompts: int = 6) -> list[dict]:
    """The shared crafted samples, with outputs of one length."""
    return feedback_data.crafted_samples(n_prompts, outputs=OUTPUTS)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("train")
    config = cfg.validate(micro_config(training={"warmup_steps": 10, "batch_size": 4, "micro_batch_size": 2,
                                                 "lr": 1e-3}))
    ckpt0 = root / "ckpt_r0" / "FINAL"
    shutil.copytree(tiny_checkpoint, ckpt0)
    files = {}
    for n in (1, 2):
        items, _ = build_pairwise(crafted_samples(), "random", 0.0, seed=n, round_n=n)
        files[n] = (root / f"feedback_r{n}.json", root / f"reflogps_r{n}.parquet")
        write_json(items, files[n][0])
        write_parquet(reference_logps(config, files[n][0], ckpt0), files[n][1])
    for n in (1, 2):
        train_round(config, n, [files[n][0]], [files[n][1]], root / f"ckpt_r{n - 1}" / "FINAL",
                    root / f"ckpt_r{n}" / "FINAL", root / f"train_r{n}.jsonl")
    return config, root, files


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_checkpoint_is_a_plain_hf_folder_with_training_state(setup):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, root, _ = setup
    final = root / "ckpt_r1" / "FINAL"
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {
        p.name for p in final.iterdir()}
    AutoModelForCausalLM.from_pretrained(final)
    assert AutoTokenizer.from_pretrained(final).chat_template
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["round"] == 1 and state["global_step"] == len(_metrics(root / "train_r1.jsonl"))
    assert "torch" in state["rng"]


def test_round_two_loads_the_adam_moments_saved_by_round_one(setup):
    config, root, _ = setup
    final = root / "ckpt_r1" / "FINAL"
    from iteralign.modeling import load_causal_lm

    model = load_causal_lm(final)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["training"]["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("constant", 10, 100))
    _, resumed = load_training_state(final, optimizer, scheduler)
    assert resumed
    saved = torch.load(final / "optimizer.pt", weights_only=True)
    assert len(optimizer.state) == len(saved["state"]) > 0
    for index, param in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[param][key], saved["state"][index][key])
    steps_r1 = len(_metrics(root / "train_r1.jsonl"))
    assert scheduler.last_epoch == steps_r1


def test_schedule_continues_across_rounds_without_repeating_warmup(setup):
    config, root, _ = setup
    r1, r2 = _metrics(root / "train_r1.jsonl"), _metrics(root / "train_r2.jsonl")
    factor = lr_lambda("constant", 10, 100)
    lr = config["training"]["lr"]
    # the lr logged after step s is base * factor(s); round 2 picks up at step len(r1) + 1
    assert [row["lr"] for row in r1] == pytest.approx([lr * factor(s) for s in range(1, len(r1) + 1)])
    assert r2[0]["step"] == len(r1) + 1
    assert r2[0]["lr"] == pytest.approx(lr * factor(len(r1) + 1))
    assert r2[0]["lr"] > r1[0]["lr"]  # a restarted warmup would start low again
    adam_step = torch.load(root / "ckpt_r2" / "FINAL" / "optimizer.pt", weights_only=True)["state"][0]["step"]
    assert int(adam_step) == len(r1) + len(r2)  # moments accumulated over both rounds


def test_reference_logps_come_from_the_sft_model_not_the_policy(setup):
    config, root, files = setup
    from_sft = reference_logps(config, files[2][0], root / "ckpt_r0" / "FINAL")
    from_policy = reference_logps(config, files[2][0], root / "ckpt_r1" / "FINAL")
    stored = pd.read_parquet(files[2][1])
    assert np.allclose(stored["reference_logp"], from_sft["reference_logp"])
    assert not np.allclose(stored["reference_logp"], from_policy["reference_logp"])


def test_training_moves_the_policy_towards_chosen(setup):
    _, root, _ = setup
    rows = _metrics(root / "train_r1.jsonl") + _metrics(root / "train_r2.jsonl")
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-6)  # round 1 starts at the reference
    assert np.mean([r["margin"] for r in rows[-3:]]) > 0


def test_kto_kl_partners_come_from_other_prompts(tmp_path):
    items, _ = build_binary(crafted_samples(4), "mean")
    path = tmp_path / "f.json"
    write_json(items, path)
    examples = unpaired_from_feedback(load_feedback(path))
    assign_kl_partners(examples, seed=0)
    owner = {s.completion: s.prompt_id for s in examples}  # outputs are unique per prompt here
    assert examples
    for s in examples:
        assert s.kl_prompt_id == s.prompt_id  # the prompt stays, the completion is someone else's
        assert owner[s.kl_completion] != s.prompt_id
    again = unpaired_from_feedback(load_feedback(path))
    assign_kl_partners(again, seed=0)
    assert [s.kl_completion for s in again] == [s.kl_completion for s in examples]


def test_kto_round_trains_on_binary_feedback(tmp_path, tiny_checkpoint):
    config = cfg.validate(micro_config(feedback={"type": "binary"}, training={"loss": "kto", "lr": 1e-3}))
    items, _ = build_binary(crafted_samples(), "mean")
    feedback, reference = tmp_path / "feedback_r1.json", tmp_path / "reflogps_r1.parquet"
    write_json(items, feedback)
    table = reference_logps(config, feedback, tiny_checkpoint)
    assert len(table) > len(items)  # completions plus the mismatched KL pairs
    write_parquet(table, reference)
    state = train_round(config, 1, [feedback], [reference], tiny_checkpoint, tmp_path / "ckpt_r1" / "FINAL",
                        tmp_path / "train_r1.jsonl")
    rows = _metrics(tmp_path / "train_r1.jsonl")
    assert state["global_step"] == len(rows) > 0
    # before the first update the policy is the reference: the KL point is exactly 0,
    # which only holds if the precomputed mismatched pairs are the ones the trainer uses
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_the_metrics_file_is_written_only_after_the_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
    """A train_r{n}.jsonl on disk means ckpt_r{n}/FINAL is complete: a job killed while
    writing the checkpoint leaves neither."""
    import iteralign.train.trainer as trainer

    config = cfg.validate(micro_config(feedback={"type": "binary"}, training={"loss": "kto", "lr": 1e-3}))
    items, _ = build_binary(crafted_samples(), "mean")
    feedback, reference = tmp_path / "feedback_r1.json", tmp_path / "reflogps_r1.parquet"
    write_json(items, feedback)
    write_parquet(reference_logps(config, feedback, tiny_checkpoint), reference)

    def killed_while_saving(*args, **kwargs):
        raise KeyboardInterrupt("killed while the checkpoint was being written")

    monkeypatch.setattr(trainer, "save_checkpoint", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        train_round(config, 1, [feedback], [reference], tiny_checkpoint, tmp_path / "ckpt_r1" / "FINAL",
                    tmp_path / "train_r1.jsonl")
    assert not (tmp_path / "ckpt_r1" / "FINAL").exists()
    assert not (tmp_path / "train_r1.jsonl").exists()

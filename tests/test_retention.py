"""Checkpoint retention (checkpoints.keep_last): what may be deleted, when, and what never is.

Through Snakemake (deletion during a run, no re-run afterwards): tests/test_workflow.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import run_cli

from iteralign.config import dump, validate
from iteralign.retention import RetentionError, prune_checkpoint


def experiment_config(root: Path, keep_last: int | None = 1, sft_checkpoint: str | None = None) -> dict:
    return validate({"results_dir": str(root / "results"), "experiment": "exp",
                     "checkpoints": {"keep_last": keep_last}, "policy": {"sft_checkpoint": sft_checkpoint}})


def make_checkpoint(folder: Path, round_n: int) -> Path:
    """A policy checkpoint as `iteralign train` leaves it: weights, trainer_state.json, sidecar."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    (folder / "trainer_state.json").write_text(json.dumps({"round": round_n, "global_step": 3}))
    (folder.parent / "FINAL.meta.json").write_text(json.dumps({"sha256": f"digest-{round_n}"}))
    return folder


def finish_training(root: Path, round_n: int) -> None:
    (root / "results/exp" / f"train_r{round_n}.jsonl").write_text('{"step": 1}\n')


@pytest.fixture
def experiment(tmp_path) -> Path:
    for n in (1, 2):
        make_checkpoint(tmp_path / "results/exp" / f"ckpt_r{n}" / "FINAL", n)
    return tmp_path


def checkpoint(root: Path, n: int) -> Path:
    return root / "results/exp" / f"ckpt_r{n}" / "FINAL"


def test_a_checkpoint_is_deleted_once_the_next_round_finished_training(experiment):
    finish_training(experiment, 2)
    record = prune_checkpoint(experiment_config(experiment), 1, checkpoint(experiment, 1))
    assert not checkpoint(experiment, 1).exists()
    assert checkpoint(experiment, 2).exists()
    assert record["deleted"] and record["bytes_freed"] > 700 and record["sha256"] == "digest-1"
    assert (experiment / "results/exp/ckpt_r1/FINAL.meta.json").exists()  # its provenance stays


def test_a_checkpoint_is_kept_while_the_next_round_has_not_finished_training(experiment):
    with pytest.raises(RetentionError, match="round 2 has not finished training"):
        prune_checkpoint(experiment_config(experiment), 1, checkpoint(experiment, 1))
    assert (checkpoint(experiment, 1) / "model.safetensors").exists()


def test_keep_last_two_waits_for_the_round_two_later(experiment):
    finish_training(experiment, 2)
    with pytest.raises(RetentionError, match="round 3 has not finished training"):
        prune_checkpoint(experiment_config(experiment, keep_last=2), 1, checkpoint(experiment, 1))
    make_checkpoint(checkpoint(experiment, 3), 3)
    finish_training(experiment, 3)
    prune_checkpoint(experiment_config(experiment, keep_last=2), 1, checkpoint(experiment, 1))
    assert not checkpoint(experiment, 1).exists()


def test_keep_last_null_deletes_nothing(experiment):
    finish_training(experiment, 2)
    with pytest.raises(RetentionError, match="keep_last is null"):
        prune_checkpoint(experiment_config(experiment, keep_last=None), 1, checkpoint(experiment, 1))
    assert checkpoint(experiment, 1).exists()


def test_ckpt_r0_is_never_deleted(experiment):
    make_checkpoint(checkpoint(experiment, 0), 0)
    finish_training(experiment, 1)
    with pytest.raises(RetentionError, match="ckpt_r0 is the SFT reference"):
        prune_checkpoint(experiment_config(experiment), 0, checkpoint(experiment, 0))
    assert checkpoint(experiment, 0).exists()


def test_a_link_to_the_users_sft_checkpoint_is_never_followed(experiment):
    user_sft = make_checkpoint(experiment / "my_sft" / "FINAL", 1)  # even one that looks like round 1's
    shutil.rmtree(checkpoint(experiment, 1))
    checkpoint(experiment, 1).symlink_to(user_sft)
    finish_training(experiment, 2)
    with pytest.raises(RetentionError, match="symbolic link"):
        prune_checkpoint(experiment_config(experiment), 1, checkpoint(experiment, 1))
    assert (user_sft / "model.safetensors").exists()


def test_the_users_sft_checkpoint_is_never_deleted_even_inside_results(experiment):
    finish_training(experiment, 2)
    config = experiment_config(experiment, sft_checkpoint=str(checkpoint(experiment, 1)))
    with pytest.raises(RetentionError, match="is or holds the SFT checkpoint"):
        prune_checkpoint(config, 1, checkpoint(experiment, 1))
    assert checkpoint(experiment, 1).exists()


def test_nothing_outside_the_experiment_folder_is_deleted(experiment):
    outside = make_checkpoint(experiment / "elsewhere/ckpt_r1/FINAL", 1)
    finish_training(experiment, 2)
    escaping = experiment / "results/exp/ckpt_r1/FINAL/../../../../elsewhere/ckpt_r1/FINAL"
    for path in (outside, escaping):
        with pytest.raises(RetentionError, match="is not round 1's policy checkpoint of this experiment"):
            prune_checkpoint(experiment_config(experiment), 1, path)
    assert outside.exists()


def test_a_round_folder_linked_from_outside_the_experiment_is_not_deleted(experiment):
    outside = make_checkpoint(experiment / "elsewhere/ckpt_r1/FINAL", 1)
    shutil.rmtree(checkpoint(experiment, 1).parent)
    checkpoint(experiment, 1).parent.symlink_to(outside.parent)
    finish_training(experiment, 2)
    with pytest.raises(RetentionError, match="is not round 1's policy checkpoint"):
        prune_checkpoint(experiment_config(experiment), 1, checkpoint(experiment, 1))
    assert outside.exists()


def test_a_folder_not_written_by_training_is_not_deleted(experiment):
    (checkpoint(experiment, 1) / "trainer_state.json").unlink()
    finish_training(experiment, 2)
    with pytest.raises(RetentionError, match="not a policy checkpoint written by `iteralign train`"):
        prune_checkpoint(experiment_config(experiment), 1, checkpoint(experiment, 1))
    assert checkpoint(experiment, 1).exists()


def test_an_already_deleted_checkpoint_is_recorded_as_absent(experiment):
    shutil.rmtree(checkpoint(experiment, 1))
    finish_training(experiment, 2)
    record = prune_checkpoint(experiment_config(experiment), 1, checkpoint(experiment, 1))
    assert record["deleted"] is False


def test_the_command_refuses_in_one_line(experiment, tmp_path):
    finish_training(experiment, 1)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump(experiment_config(experiment)))
    result = run_cli("prune", "--config", str(config_file), "--round", "0", "--checkpoint",
                     str(checkpoint(experiment, 0)), "--output", str(tmp_path / "pruned.json"), check=False)
    assert result.returncode == 2
    assert "iteralign prune: error: round 0: ckpt_r0 is the SFT reference and is never deleted" in result.stderr


@pytest.mark.parametrize("successor_state", ["missing", "killed before its trainer state", "no sidecar",
                                             "another round's"])
def test_a_checkpoint_is_kept_while_its_successor_is_not_complete_whatever_the_metrics_say(experiment,
                                                                                            successor_state):
    successor = checkpoint(experiment, 2)
    if successor_state == "missing":
        shutil.rmtree(successor)
    elif successor_state == "killed before its trainer state":
        (successor / "trainer_state.json").unlink()
    elif successor_state == "no sidecar":
        (successor.parent / "FINAL.meta.json").unlink()
    else:
        (successor / "trainer_state.json").write_text(json.dumps({"round": 1}))
    finish_training(experiment, 2)  # a complete-looking train_r2.jsonl
    with pytest.raises(RetentionError, match="round 2's checkpoint .* is not complete"):
        prune_checkpoint(experiment_config(experiment), 1, checkpoint(experiment, 1))
    assert (checkpoint(experiment, 1) / "model.safetensors").exists()


def test_a_successor_deleted_by_retention_counts_as_complete(experiment):
    make_checkpoint(checkpoint(experiment, 3), 3)
    finish_training(experiment, 3)
    config = experiment_config(experiment, keep_last=1)
    finish_training(experiment, 2)
    pruned = prune_checkpoint(config, 2, checkpoint(experiment, 2))
    (experiment / "results/exp/ckpt_r2/pruned.json").write_text(json.dumps(pruned))
    assert prune_checkpoint(config, 1, checkpoint(experiment, 1))["deleted"] is True


def test_a_successor_that_another_prune_is_deleting_counts_as_complete(experiment):
    """Two prune jobs run at once: round 2's has renamed its FINAL and not yet written pruned.json."""
    make_checkpoint(checkpoint(experiment, 3), 3)
    finish_training(experiment, 2)
    finish_training(experiment, 3)
    successor = checkpoint(experiment, 2)
    successor.rename(successor.with_name(".FINAL.pruning-12345"))
    assert prune_checkpoint(experiment_config(experiment, keep_last=1), 1, checkpoint(experiment, 1))["deleted"]


def test_pruning_again_keeps_the_record_of_the_first_deletion(experiment):
    finish_training(experiment, 2)
    first = prune_checkpoint(experiment_config(experiment), 1, checkpoint(experiment, 1))
    (experiment / "results/exp/ckpt_r1/pruned.json").write_text(json.dumps(first))
    again = prune_checkpoint(experiment_config(experiment), 1, checkpoint(experiment, 1))
    assert again == first and again["deleted"] is True and again["sha256"] == "digest-1"


def test_pruning_frees_the_last_good_stores_links_too(experiment):
    from iteralign.last_good import STORE, keep_last_good, restore

    exp = experiment / "results/exp"
    keep_last_good(exp)
    stored = exp / STORE / "ckpt_r1/FINAL/model.safetensors"
    assert stored.is_file()
    finish_training(experiment, 2)
    record = prune_checkpoint(experiment_config(experiment), 1, checkpoint(experiment, 1))
    (exp / "ckpt_r1/pruned.json").write_text(json.dumps(record))
    assert not stored.exists()
    assert restore(exp) == []  # a checkpoint retention deleted is never put back
    assert not checkpoint(experiment, 1).exists()

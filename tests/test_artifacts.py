"""Atomic writes and provenance."""

import json

import pandas as pd
import pytest

from iteralign.artifacts import (
    Provenance,
    atomic_dir,
    read_provenance,
    read_sidecar,
    sidecar_path,
    write_json,
    write_parquet,
)


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "feedback_r1.json"
    write_json([1, 2], path)
    with pytest.raises(TypeError):
        write_json([object()], path)  # not serialisable: fails mid-write
    assert json.loads(path.read_text()) == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["feedback_r1.json"]


def test_failed_folder_never_appears(tmp_path):
    final = tmp_path / "ckpt_r1" / "FINAL"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("killed")
    assert not final.exists()
    assert list((tmp_path / "ckpt_r1").iterdir()) == []


def test_folder_replaces_an_empty_folder_and_gets_a_sidecar_with_its_hash(tmp_path):
    final = tmp_path / "FINAL"
    final.mkdir()
    with atomic_dir(final, provenance={"step": "train"}) as tmp:
        (tmp / "a.txt").write_text("x")
    assert (final / "a.txt").read_text() == "x"
    meta = read_sidecar(final)
    assert meta["step"] == "train" and len(meta["sha256"]) == 64
    assert sidecar_path(final).name == "FINAL.meta.json"


def test_parquet_carries_provenance(tmp_path):
    source = tmp_path / "in.json"
    source.write_text("[]")
    prov = Provenance("score", "abc123", seed=7, inputs={"samples": source})
    path = tmp_path / "rewards_r1.parquet"
    write_parquet(pd.DataFrame({"reward": [1.0]}), path, prov.record(round=1))
    meta = read_provenance(path)
    assert meta["config_hash"] == "abc123" and meta["seed"] == 7 and meta["round"] == 1
    assert meta["inputs"]["samples"]["sha256"] == (
        "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945")  # sha256 of "[]"
    assert {"iteralign_version", "git_commit", "host", "started", "finished"} <= set(meta)


def test_json_sidecar_hash_matches_file(tmp_path):
    from iteralign.artifacts import file_sha256

    path = tmp_path / "eval_r0.json"
    write_json({"a": 1}, path, {"step": "evaluate"})
    assert read_sidecar(path)["sha256"] == file_sha256(path)

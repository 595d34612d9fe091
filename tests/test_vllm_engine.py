"""The real vLLM in the loop: the CPU build (``make vllm`` -> .venv-vllm) samples and evaluates a micro workflow.

One Snakemake run with ``sampling.backend: vllm`` is shared by the tests: its sample and
evaluate jobs run with .venv-vllm's Python (the rest with this one). The rows are compared
with the transformers backend's on the same checkpoints. vLLM's CPU attention needs a head
size of 32 or more, so the SFT model here has 2 heads of 32.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import EXP, REPO, new_workdir, snakemake
from served_models import VLLM_PYTHON, require_vllm

from iteralign.artifacts import read_parquet, read_provenance

pytestmark = [pytest.mark.workflow, pytest.mark.vllm]
STOP = "5"
SECTIONS = {
    "rounds": 1,
    "sft": {"num_examples": 1024, "batch_size": 64, "lr": 0.003, "warmup_steps": 2,
            "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_layers": 1, "num_heads": 2}},
    "sampling": {"backend": "vllm", "num_samples": 4, "temperature": 1.0, "max_new_tokens": 5, "stop": [STOP]},
    "evaluation": {"num_prompts": 12, "max_new_tokens": 5, "bootstrap_samples": 200, "temperature": 0.0},
}


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory) -> Path:
    require_vllm()  # skips without .venv-vllm, fails in CI (make test builds it)
    workdir = new_workdir(tmp_path_factory.mktemp("vllm") / "a", **SECTIONS)
    snakemake(workdir)
    return workdir


def resolved_config(workdir: Path) -> Path:
    (path,) = (workdir / EXP / "config").glob("config_*.yaml")
    return path


def vllm_cli(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VLLM_PYTHON), "-m", "iteralign.cli", *args], cwd=workdir, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=600)


def hf_generation(workdir: Path, checkpoint: Path, messages: list, decoding: dict) -> list:
    from iteralign.config import load
    from iteralign.sample import generate

    config = load(resolved_config(workdir))
    config["sampling"]["backend"] = "hf"
    return generate(str(checkpoint), messages, decoding, config, seed=0).completions


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def test_sample_and_evaluate_ran_on_vllm_from_its_own_environment(vllm_run):
    assert read_provenance(vllm_run / EXP / "samples_r1.parquet")["backend"] == "vllm"
    log = (vllm_run / "logs" / "micro" / "sample_r1.log").read_text()
    assert "Initializing a V1 LLM engine" in log  # vLLM's own engine, not a stand-in
    for n in (0, 1):
        assert json.loads((vllm_run / EXP / f"eval_r{n}.json").read_text())["backend"] == "vllm"


def test_samples_have_the_hf_backends_columns_dtypes_and_meaning(vllm_run):
    from iteralign.modeling import load_tokenizer

    samples = read_parquet(vllm_run / EXP / "samples_r1.parquet")
    checkpoint = vllm_run / EXP / "ckpt_r0" / "FINAL"
    assert len(samples) == 12 * 4
    # the hf backend's rows for the same prompts, through the same frame builder
    from iteralign.sample import sample_frame

    prompts = list(samples.drop_duplicates("prompt_id")["prompt"])
    messages = [list(p) for p in prompts]
    decoding = {"num_samples": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 5, "stop": [STOP]}
    hf = sample_frame(1, list(samples.drop_duplicates("prompt_id")["prompt_id"]), messages,
                      list(samples.drop_duplicates("prompt_id")["prompt_text"]),
                      hf_generation(vllm_run, checkpoint, messages, decoding), str(checkpoint), 0)
    assert list(samples.columns) == list(hf.columns)
    assert dict(samples.dtypes.astype(str)) == dict(hf.dtypes.astype(str))

    tokenizer = load_tokenizer(checkpoint)
    for frame in (samples, hf):
        assert set(frame["finish_reason"]) <= {"stop", "length"}
        assert not frame["output"].str.contains(STOP, regex=False).any()  # cut before the stop string
        kinds = {"eos": 0, "stop_string": 0, "length": 0, "special_tokens": 0}
        for row in frame.itertuples():
            kept = token_count(tokenizer, row.output)
            if row.finish_reason == "length":
                assert row.num_output_tokens == 5
                kinds["length"] += 1
            elif row.num_output_tokens == kept:  # cut at a stop string: the kept text's tokens
                kinds["stop_string"] += 1
            elif row.num_output_tokens == kept + 1:  # EOS, counted
                kinds["eos"] += 1
            else:  # special tokens (<pad>, <bos>) before the EOS: generated and counted, not shown in the text
                assert row.num_output_tokens > kept + 1
                kinds["special_tokens"] += 1
        assert kinds["eos"] > 0 and kinds["stop_string"] > 0, kinds


def test_the_same_seed_gives_identical_samples(vllm_run, tmp_path):
    again = tmp_path / "samples_again.parquet"
    result = vllm_cli(vllm_run, "sample", "--config", str(resolved_config(vllm_run)), "--round", "1",
                      "--prompts", str(EXP / "prompts.parquet"), "--checkpoint", str(EXP / "ckpt_r0" / "FINAL"),
                      "--output", str(again), "--threads", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    pd.testing.assert_frame_equal(read_parquet(again), read_parquet(vllm_run / EXP / "samples_r1.parquet"))


@pytest.mark.parametrize("n", [0, 1])
def test_greedy_evaluation_equals_the_hf_backend_on_every_prompt(vllm_run, n):
    from iteralign.config import load
    from iteralign.evaluate import decoding_settings

    table = read_parquet(vllm_run / EXP / f"eval_r{n}.parquet")
    assert len(table) == 12
    decoding = {**decoding_settings(load(resolved_config(vllm_run))), "num_samples": 1}
    hf = hf_generation(vllm_run, vllm_run / EXP / f"ckpt_r{n}" / "FINAL", [list(p) for p in table["prompt"]],
                       decoding)
    assert [c[0].text for c in hf] == list(table["output"])
    assert [c[0].num_tokens for c in hf] == list(table["num_output_tokens"])
    assert [c[0].finish_reason for c in hf] == list(table["finish_reason"])


@pytest.fixture(scope="module")
def narrow_checkpoint(tmp_path_factory, tiny_tokenizer) -> Path:
    """A Llama with heads of 16: transformers runs it, vLLM's CPU attention does not."""
    from iteralign.tiny import build_llama

    path = tmp_path_factory.mktemp("narrow") / "ckpt"
    build_llama(tiny_tokenizer, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                seed=0).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(("sampling", "checkpoint", "key"), [
    ({}, "narrow", "sampling.backend: hf"),
    ({"kv_cache_memory_gb": 4096}, "run", "sampling.kv_cache_memory_gb"),
])
def test_an_engine_that_cannot_start_stops_the_job_with_one_line_naming_the_key(
        vllm_run, narrow_checkpoint, tmp_path, sampling, checkpoint, key):
    config = yaml.safe_load(resolved_config(vllm_run).read_text())
    config["sampling"].update(sampling)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    folder = narrow_checkpoint if checkpoint == "narrow" else vllm_run / EXP / "ckpt_r0" / "FINAL"
    output = tmp_path / "samples.parquet"
    result = vllm_cli(vllm_run, "sample", "--config", str(tmp_path / "config.yaml"), "--round", "1",
                      "--prompts", str(EXP / "prompts.parquet"), "--checkpoint", str(folder),
                      "--output", str(output), "--threads", "1")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"vLLM failed on {folder}" in last and key in last, last
    assert not output.exists()

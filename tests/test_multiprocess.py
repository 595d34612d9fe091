"""Several processes on CPU (gloo) compute what one process computes.

2 processes and 1 process, with the same global batch, log the same losses and end
with the same weights; the reference job's shards come back in order; FSDP-sharded
optimizer state saves whole and loads back. The models are tiny: each launch costs
mostly the start-up of two Python processes.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from feedback_data import nine_pairs
from helpers import BIN, REPO, accelerate_launch, free_port, launch_env, micro_config
from safetensors.torch import load_file

from iteralign import config as cfg
from iteralign.artifacts import write_json, write_parquet
from iteralign.reference import reference_logps
from iteralign.train.checkpoint import load_training_state
from iteralign.train.trainer import train_round


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("multiprocess")
    write_json(nine_pairs(), root / "feedback_r1.json")
    raw = micro_config(training={"batch_size": 4, "micro_batch_size": 1, "lr": 1e-3, "warmup_steps": 0, "epochs": 2})
    (root / "config.yaml").write_text(yaml.safe_dump(raw))
    config = cfg.validate(raw)
    # one process: in this process; two: through the command line, as the rules launch them
    write_parquet(reference_logps(config, root / "feedback_r1.json", tiny_checkpoint), root / "reflogps_1proc.parquet")
    train_round(config, 1, [root / "feedback_r1.json"], [root / "reflogps_1proc.parquet"], tiny_checkpoint,
                root / "ckpt_1proc/FINAL", root / "train_1proc.jsonl")
    common = ["--config", "config.yaml", "--round", "1", "--feedback", "feedback_r1.json"]
    accelerate_launch("reference", *common, "--checkpoint", str(tiny_checkpoint), "--output", "reflogps_2proc.parquet",
                      cwd=root)
    accelerate_launch("train", *common, "--reference", "reflogps_1proc.parquet", "--checkpoint", str(tiny_checkpoint),
                      "--output", "ckpt_2proc/FINAL", "--metrics", "train_2proc.jsonl", cwd=root)
    return root


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_compute_the_reference_table_of_one_in_the_same_order(runs):
    one, two = pd.read_parquet(runs / "reflogps_1proc.parquet"), pd.read_parquet(runs / "reflogps_2proc.parquet")
    assert len(one) == 18
    assert list(two["completion_key"]) == list(one["completion_key"])
    assert np.allclose(two["reference_logp"], one["reference_logp"], rtol=0, atol=1e-5)
    assert list(two["num_tokens"]) == list(one["num_tokens"])


def test_two_processes_log_the_losses_of_one_process(runs):
    one, two = metrics(runs / "train_1proc.jsonl"), metrics(runs / "train_2proc.jsonl")
    assert [row["examples"] for row in one] == [4, 4, 1, 4, 4, 1]
    assert [row["step"] for row in two] == [row["step"] for row in one]
    for key in ("loss", "margin", "accuracy", "grad_norm", "tokens"):
        assert [row[key] for row in two] == pytest.approx([row[key] for row in one], rel=1e-5, abs=1e-6), key
    assert json.loads((runs / "ckpt_2proc/FINAL/trainer_state.json").read_text())["world_size"] == 2


def test_two_processes_end_with_the_weights_and_optimizer_state_of_one(runs, tiny_checkpoint):
    one = load_file(runs / "ckpt_1proc/FINAL/model.safetensors")
    two = load_file(runs / "ckpt_2proc/FINAL/model.safetensors")
    start = load_file(Path(tiny_checkpoint) / "model.safetensors")
    assert one.keys() == two.keys()
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3  # training moved the weights
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    state_one = torch.load(runs / "ckpt_1proc/FINAL/optimizer.pt", weights_only=True)["state"]
    state_two = torch.load(runs / "ckpt_2proc/FINAL/optimizer.pt", weights_only=True)["state"]
    assert state_one and state_one.keys() == state_two.keys()
    assert all(torch.allclose(state_one[i]["exp_avg"], state_two[i]["exp_avg"], atol=1e-6) for i in state_one)


def test_fsdp_sharded_optimizer_state_saves_whole_and_resumes_on_one_process(tmp_path):
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(REPO / "tests" / "fsdp_checkpoint_worker.py"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=launch_env())
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("optimizer state round trip ok") == 2

    # the same step on one unsharded process gives the moments the 2 shards saved
    sys.path.insert(0, str(REPO / "tests"))
    from fsdp_checkpoint_worker import INPUT

    from iteralign.demo import ALPHABET
    from iteralign.tiny import build_char_tokenizer, build_llama

    model = build_llama(build_char_tokenizer(ALPHABET), hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=2, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=INPUT, labels=INPUT).loss.backward()
    optimizer.step()
    resumed = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(resumed, lambda step: 1.0)
    _, loaded = load_training_state(tmp_path, resumed, scheduler)
    assert loaded
    for param in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(resumed.state[param][key], optimizer.state[param][key], atol=1e-7), key

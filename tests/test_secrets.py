"""The judge's API key never leaves the process, even when the endpoint echoes it back in every kind of reply."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
import yaml
from fake_openai import ECHO, Action, FakeJudge, reply
from helpers import micro_config, run_cli

from iteralign.redaction import REDACTED, RedactingFilter, redact, register_secret_env

KEY_ENV = "ITERALIGN_TEST_ECHO_KEY"
PROMPT = [{"role": "user", "content": "Name a prime."}]

# One completion per kind of reply; the fake server puts the caller's key into each.
ECHOING_REPLIES = {
    "malformed-json": Action(body=b'{"choices": [ "' + ECHO.encode()),
    "words": reply(f"I will not grade this. Your key {ECHO} works."),
    "non-numeric": reply(f"Final Score: {ECHO}"),
    "scored-with-key": reply(f"Key {ECHO} seen.\nFinal Score: 7"),
    "http-400": Action(status=400, body=json.dumps({"error": {"message": f"bad request from {ECHO}"}}).encode()),
    "http-401": Action(status=401, body=json.dumps({"error": {"message": f"invalid key {ECHO}"}}).encode()),
    "http-500": Action(status=500, body=json.dumps({"error": {"message": f"crash for {ECHO}"}}).encode(),
                       headers={"X-Echo": ECHO}),
    "http-502-html": Action(status=502, body=f"<html>bad gateway {ECHO}</html>".encode(),
                            headers={"Content-Type": "text/html", "WWW-Authenticate": f"Bearer {ECHO}"}),
    "http-429": Action(status=429, body=json.dumps({"error": {"message": f"slow down {ECHO}"}}).encode(),
                       headers={"Retry-After": "0", "X-Key": ECHO}),
}


def echoing(completion: str, attempt: int) -> Action:
    return ECHOING_REPLIES[completion]


def score_command(tmp_path, base_url: str, max_failed_fraction: float) -> tuple[str, ...]:
    samples = tmp_path / "samples_r1.parquet"
    outputs = list(ECHOING_REPLIES)
    pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(outputs))], "sample_id": 0,
                  "prompt": [PROMPT] * len(outputs), "output": outputs}).to_parquet(samples)
    config = micro_config(results_dir=str(tmp_path / "results"), scoring={
        "scorer": "judge", "max_failed_fraction": max_failed_fraction,
        "judge": {"model": "fake-judge", "base_url": base_url, "api_key_env": KEY_ENV, "max_attempts": 2,
                  "backoff_initial": 0.01, "backoff_max": 0.05, "timeout": 2.0}})
    config_file = tmp_path / f"exp_{max_failed_fraction}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return ("--log-level", "debug", "score", "--config", str(config_file), "--round", "1",
            "--samples", str(samples), "--output", str(tmp_path / "results" / "micro" / "rewards_r1.parquet"))


@pytest.mark.parametrize("key", ["sk-live-4f3e2d1c0b9a8877", "plainkey-0123456789abcdef"])
def test_an_echoed_key_reaches_no_artefact_cache_log_or_stderr(key, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, key)
    with FakeJudge(echoing) as judge:
        scored = run_cli(*score_command(tmp_path, judge.base_url, 1.0))  # every failure kept in the table
        refused = run_cli(*score_command(tmp_path, judge.base_url, 0.0), check=False)  # the reasons on stderr
    assert {r.authorization for r in judge.requests} == {f"Bearer {key}"}  # the server had the key to echo
    assert refused.returncode == 2 and "iteralign score: error:" in refused.stderr
    rewards = pd.read_parquet(tmp_path / "results" / "micro" / "rewards_r1.parquet")
    errors = rewards["error"].dropna().tolist()
    assert len(errors) == len(ECHOING_REPLIES) - 1  # all but "scored-with-key" failed, each with its reason
    assert any(REDACTED in e for e in errors)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("judge_cache" in str(p) for p in files)
    for text in (scored.stdout, scored.stderr, refused.stdout, refused.stderr):
        assert key not in text
    for path in files:
        assert key.encode() not in path.read_bytes(), path


def test_redact_replaces_registered_values_and_key_shapes(monkeypatch):
    monkeypatch.setenv("ITERALIGN_TEST_OTHER_KEY", "value-without-prefix-42")
    register_secret_env("ITERALIGN_TEST_OTHER_KEY")
    text = "a value-without-prefix-42 and sk-abcdef123456 and sk-****wxyz"
    assert redact(text) == f"a {REDACTED} and {REDACTED} and {REDACTED}"


def test_log_lines_pass_the_redacting_filter(monkeypatch, caplog):
    monkeypatch.setenv("ITERALIGN_TEST_OTHER_KEY", "value-without-prefix-42")
    register_secret_env("ITERALIGN_TEST_OTHER_KEY")
    logger = logging.getLogger("iteralign.test_secrets")
    caplog.handler.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("reply %s", "value-without-prefix-42")
    assert caplog.messages == [f"reply {REDACTED}"]

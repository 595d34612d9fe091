"""The LLM judge against a real chat-completions server on 127.0.0.1, with injected faults."""

from __future__ import annotations

import json
import math
import random
import socket

import pandas as pd
import pytest
import yaml
from fake_openai import Action, FakeJudge, reply
from helpers import micro_config, run_cli

from iteralign import config as cfg
from iteralign.score import ScoringError
from iteralign.score.judge import JudgeScorer, backoff_delay, parse_score, redact, render_messages

SECRET = "sk-test-9f8e7d6c5b4a39281706"
PROMPT = [{"role": "user", "content": "Name a prime."}]


def judge_section(base_url: str, **overrides) -> dict:
    section = cfg.validate({"scoring": {"scorer": "judge", "judge": {"model": "fake-judge", "base_url": base_url}}})
    judge = section["scoring"]["judge"]
    judge.update({"api_key_env": "ITERALIGN_TEST_JUDGE_KEY", "timeout": 0.5, "max_attempts": 3,
                  "backoff_initial": 0.01, "backoff_max": 2.0, "concurrency": 4, "score_range": [0, 100]})
    judge.update(overrides)
    return judge


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("ITERALIGN_TEST_JUDGE_KEY", SECRET)


def scorer(base_url, tmp_path, max_failed_fraction=1.0, **overrides) -> JudgeScorer:
    return JudgeScorer(judge_section(base_url, **overrides), cache_dir=tmp_path / "judge_cache",
                       max_failed_fraction=max_failed_fraction)


def transient_faults(completion: str, attempt: int) -> Action:
    """Every fault that a retry cures, plus replies that no retry changes."""
    if completion == "rate-limited" and attempt == 1:
        return Action(status=429, headers={"Retry-After": "1"})
    if completion == "server-error" and attempt <= 2:
        return Action(status=500)
    if completion == "slow" and attempt == 1:
        return Action(delay=2.0, content="Final Score: 1")
    if completion == "malformed" and attempt == 1:
        return Action(body=b'{"choices": [')
    if completion == "words":
        return reply("A lovely answer, well done.")
    if completion == "too-high":
        return reply("Final Score: 420")
    return reply(f"The answer is fine.\nFinal Score: {len(completion)}")


OUTPUTS = ["rate-limited", "server-error", "slow", "malformed", "words", "too-high", "fine"]


def test_transient_faults_are_retried_until_a_reply(tmp_path):
    with FakeJudge(transient_faults) as judge:
        result = scorer(judge.base_url, tmp_path).score([PROMPT] * len(OUTPUTS), OUTPUTS)
        attempts = {o: judge.attempts(o) for o in OUTPUTS}
    assert attempts == {"rate-limited": 2, "server-error": 3, "slow": 2, "malformed": 2, "words": 1,
                        "too-high": 1, "fine": 1}
    assert result.rewards[:4] == [12.0, 12.0, 4.0, 9.0] and result.rewards[6] == 4.0
    assert result.errors[:4] == [None] * 4
    assert result.usage["retries"] == 1 + 2 + 1 + 1
    assert result.usage["requests_sent"] == sum(attempts.values())


def test_retry_after_is_waited_for(tmp_path):
    with FakeJudge(transient_faults) as judge:
        scorer(judge.base_url, tmp_path).score([PROMPT], ["rate-limited"])
        first, second = [r.arrived for r in judge.requests]
    assert second - first >= 1.0  # the server asked for 1 second


def test_unparsable_and_out_of_range_replies_are_nan_with_the_reason(tmp_path):
    with FakeJudge(transient_faults) as judge:
        result = scorer(judge.base_url, tmp_path).score([PROMPT] * 3, ["words", "too-high", "fine"])
    assert math.isnan(result.rewards[0]) and "unparsable judge reply: 'A lovely answer" in result.errors[0]
    assert math.isnan(result.rewards[1]) and "outside scoring.judge.score_range [0, 100]" in result.errors[1]
    assert result.rewards[2] == 4.0 and result.usage["unparsable"] == 2


def test_a_second_run_sends_no_request(tmp_path):
    with FakeJudge(transient_faults) as judge:
        first = scorer(judge.base_url, tmp_path).score([PROMPT] * len(OUTPUTS), OUTPUTS)
        sent = len(judge.requests)
        again = scorer(judge.base_url, tmp_path).score([PROMPT] * len(OUTPUTS), OUTPUTS)
        assert len(judge.requests) == sent
    assert again.usage["requests_sent"] == 0 and again.usage["cache_hits"] == len(OUTPUTS)
    assert [str(x) for x in again.rewards] == [str(x) for x in first.rewards]
    assert again.errors == first.errors


def test_the_cache_key_covers_model_and_sampling_parameters(tmp_path):
    with FakeJudge(transient_faults) as judge:
        scorer(judge.base_url, tmp_path).score([PROMPT], ["fine"])
        scorer(judge.base_url, tmp_path, temperature=0.7).score([PROMPT], ["fine"])
        scorer(judge.base_url, tmp_path, model="other-judge").score([PROMPT], ["fine"])
        assert judge.attempts("fine") == 3


def test_identical_requests_in_one_run_are_sent_once(tmp_path):
    with FakeJudge(transient_faults) as judge:
        result = scorer(judge.base_url, tmp_path).score([PROMPT] * 4, ["fine"] * 4)
        assert judge.attempts("fine") == 1
    assert result.rewards == [4.0] * 4


def persistent_faults(completion: str, attempt: int) -> Action:
    if completion == "always-500":
        return Action(status=503)
    if completion == "always-slow":
        return Action(delay=2.0, content="Final Score: 1")
    if completion == "always-malformed":
        return Action(body=b"not json at all")
    return reply("Final Score: 7")


def test_after_the_last_attempt_the_reward_is_nan_never_zero(tmp_path):
    outputs = ["always-500", "always-slow", "always-malformed", "fine"]
    with FakeJudge(persistent_faults) as judge:
        result = scorer(judge.base_url, tmp_path).score([PROMPT] * 4, outputs)
        assert [judge.attempts(o) for o in outputs] == [3, 3, 3, 1]
    assert all(math.isnan(r) for r in result.rewards[:3]) and result.rewards[3] == 7.0
    assert result.errors[0].startswith("HTTP 503") and result.errors[0].endswith("(after 3 attempts)")
    assert result.errors[1] == "timed out after 0.5s (after 3 attempts)"
    assert result.errors[2].startswith("malformed reply body")
    assert result.usage["failed_requests"] == 3


def test_failures_are_not_cached(tmp_path):
    failing = {"flag": True}

    def behaviour(completion, attempt):
        return Action(status=500) if failing["flag"] else reply("Final Score: 3")

    with FakeJudge(behaviour) as judge:
        first = scorer(judge.base_url, tmp_path, max_attempts=1).score([PROMPT], ["x"])
        failing["flag"] = False
        second = scorer(judge.base_url, tmp_path, max_attempts=1).score([PROMPT], ["x"])
    assert math.isnan(first.rewards[0]) and second.rewards == [3.0]


def test_concurrency_is_bounded(tmp_path):
    outputs = [f"sample-{i}" for i in range(12)]
    with FakeJudge(lambda c, a: Action(delay=0.1, content="Final Score: 5")) as judge:
        scorer(judge.base_url, tmp_path, concurrency=3).score([PROMPT] * 12, outputs)
        assert 1 < judge.max_in_flight <= 3


def test_a_judge_that_refuses_everything_fails_the_round_early(tmp_path):
    outputs = [f"sample-{i}" for i in range(40)]
    with FakeJudge(lambda c, a: Action(status=503)) as judge:
        with pytest.raises(ScoringError, match=r"11 of 40 samples failed, more than scoring.max_failed_fraction=0.25 "
                                               r"allows; stopped with \d+ not scored. Reasons: 11 x HTTP 503.*"
                                               r"after 3 attempts"):
            scorer(judge.base_url, tmp_path, max_failed_fraction=0.25).score([PROMPT] * 40, outputs)
        # 0.25 x 40 = 10 failures allowed: the 11th stops it; the last samples are never sent
        assert len(judge.requests) < 40 * 3
        assert len({r.completion for r in judge.requests}) < 40


def test_an_endpoint_that_is_not_listening_fails_the_round(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens there
    with pytest.raises(ScoringError, match=r"2 of 2 samples failed.*connection error"):
        scorer(f"http://127.0.0.1:{port}/v1", tmp_path, max_failed_fraction=0.5).score([PROMPT] * 2, ["a", "b"])


def test_a_wrong_key_is_not_retried_and_never_echoed(tmp_path):
    def unauthorized(completion, attempt):
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {SECRET}"}}).encode()
        return Action(status=401, body=body)

    with FakeJudge(unauthorized) as judge:
        result = scorer(judge.base_url, tmp_path).score([PROMPT] * 2, ["a", "b"])
        assert len(judge.requests) == 2  # one each: retrying cannot fix a key
        assert judge.requests[0].authorization == f"Bearer {SECRET}"
    assert result.errors[0].startswith("HTTP 401") and "[redacted]" in result.errors[0]
    assert SECRET not in " ".join(result.errors)


def test_a_missing_key_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("ITERALIGN_TEST_JUDGE_KEY")
    with pytest.raises(ValueError, match="environment variable ITERALIGN_TEST_JUDGE_KEY is not set"):
        scorer("http://127.0.0.1:9/v1", tmp_path)


@pytest.mark.parametrize(("text", "expected"), [
    ("Helpful. Final Score: 7", 7.0),
    ("Final score: 3\nOn reflection... Final Score = 8.5", 8.5),  # the last match counts
    ("  6 ", 6.0),  # a bare number
    ("1. Helpful 2. Correct", None),  # HALOs would read 1 here
    ("Final Score: 11", None),
    ("", None),
])
def test_score_parsing_rule(text, expected):
    pattern = cfg.validate({})["scoring"]["judge"]["score_pattern"]
    value, error = parse_score(text, pattern, [0, 10])
    if expected is None:
        assert math.isnan(value) and error
    else:
        assert value == expected and error is None


def test_template_fills_prompt_and_output_once():
    messages = render_messages("rubric", "Q: {prompt}\nA: {output}\n{keep}", PROMPT, "says {prompt}")
    assert messages == [{"role": "system", "content": "rubric"},
                        {"role": "user", "content": "Q: Name a prime.\nA: says {prompt}\n{keep}"}]


def test_backoff_doubles_with_jitter_and_a_cap():
    rng = random.Random(0)
    delays = [backoff_delay(a, 1.0, 5.0, rng) for a in (1, 2, 3, 4, 5)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 2.0 <= delays[2] <= 4.0
    assert all(2.5 <= d <= 5.0 for d in delays[3:])


def test_redact_removes_masked_keys_too():
    assert redact(f"key {SECRET} or sk-abc1***xyz9", SECRET) == "key [redacted] or [redacted]"


def test_score_step_keeps_the_key_out_of_logs_and_artefacts(tmp_path):
    """The score command end to end: rewards, usage in provenance, and the key nowhere on disk."""
    from iteralign.artifacts import read_provenance

    samples = tmp_path / "samples_r1.parquet"
    pd.DataFrame({"prompt_id": ["a", "a", "b"], "sample_id": [0, 1, 0], "prompt": [PROMPT] * 3,
                  "output": ["fine", "words", "four"], "num_output_tokens": [2, 3, 2]}).to_parquet(samples)
    with FakeJudge(transient_faults) as judge:
        config = micro_config(results_dir=str(tmp_path / "results"), scoring={
            "scorer": "judge", "max_failed_fraction": 0.5,
            "judge": {"model": "fake-judge", "base_url": judge.base_url, "api_key_env": "ITERALIGN_TEST_JUDGE_KEY"}})
        config_file = tmp_path / "exp.yaml"
        config_file.write_text(yaml.safe_dump(config))
        output = tmp_path / "results" / "micro" / "rewards_r1.parquet"
        args = ("--log-level", "debug", "score", "--config", str(config_file), "--round", "1",
                "--samples", str(samples), "--output", str(output))
        first = run_cli(*args)
        second = run_cli(*args)
        assert len(judge.requests) == 3  # the second run sent nothing
    rewards = pd.read_parquet(output)
    assert rewards["reward"].tolist()[0] == 4.0 and math.isnan(rewards["reward"].tolist()[1])
    usage = read_provenance(output)["usage"]
    assert usage["cache_hits"] == 3 and usage["cached_prompt_tokens"] == 30
    resolved = cfg.dump(cfg.load(config_file))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("judge_cache" in str(p) for p in files)
    for text in [first.stdout, first.stderr, second.stdout, second.stderr, resolved]:
        assert SECRET not in text
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path

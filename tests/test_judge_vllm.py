"""The judge scorer against a real OpenAI-compatible server: vLLM's, serving a small local chat model.

The served model (tests/served_models.py) answers every chat with "Final Score:7" under
greedy decoding, so the replies, their token counts and vLLM's request counters are known.
Faults that a real server does not produce on demand (429, 500, timeouts, malformed JSON)
stay with the fake server in tests/test_judge.py.
"""

from __future__ import annotations

import math

import pytest
from served_models import build_bigram_judge, request_counts, require_vllm, vllm_server

from iteralign import config as cfg
from iteralign.score.judge import JudgeScorer, render_messages

pytestmark = pytest.mark.vllm
PROMPTS = [[{"role": "user", "content": f"What is {a}+{a * 3}?"}] for a in range(12)]
OUTPUTS = [f"It is {a * 4}." if a % 3 else f"I think {a * 4}, since {a}+{a * 3} = {a * 4}." for a in range(12)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The root URL of vLLM's server serving the judge model as tiny-judge."""
    python = require_vllm()
    model = build_bigram_judge(tmp_path_factory.mktemp("judge") / "model")
    log = tmp_path_factory.mktemp("judge_server") / "server.log"
    with vllm_server(python, model, log, "--served-model-name", "tiny-judge") as root:
        yield root


def judge(root: str, cache_dir, **overrides) -> JudgeScorer:
    section = cfg.validate({"scoring": {"scorer": "judge", "judge": {
        "model": "tiny-judge", "base_url": f"{root}/v1", "api_key_env": None, "concurrency": 4, "timeout": 60,
        "max_attempts": 2, **overrides}}})["scoring"]["judge"]
    return JudgeScorer(section, cache_dir=cache_dir, max_failed_fraction=1.0)


def prompt_tokens(section) -> int:
    """What the server's usage must count: the judge's messages through the model's chat template."""
    from served_models import build_chatml_tokenizer

    tokenizer = build_chatml_tokenizer()
    total = 0
    for prompt, output in zip(PROMPTS, OUTPUTS, strict=True):
        messages = render_messages(section["system_prompt"], section["template"], prompt, output)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        total += len(tokenizer(text, add_special_tokens=False).input_ids)
    return total


def test_every_sample_is_scored_by_the_server_with_its_token_usage(server, tmp_path):
    before = request_counts(server)
    scorer = judge(server, tmp_path / "cache")
    result = scorer.score(PROMPTS, OUTPUTS)
    assert result.rewards == [7.0] * len(PROMPTS) and result.errors == [None] * len(PROMPTS)
    assert (result.usage["requests_sent"], result.usage["replies"], result.usage["retries"]) == (12, 12, 0)
    assert result.usage["prompt_tokens"] == prompt_tokens(scorer.cfg)
    assert result.usage["completion_tokens"] == 12 * 10  # "Fi n al Ġ Sc o re : 7" and <|im_end|>
    assert request_counts(server)["stop"] - before["stop"] == 12


def test_a_second_run_is_answered_by_the_cache_and_sends_nothing(server, tmp_path):
    judge(server, tmp_path / "cache").score(PROMPTS, OUTPUTS)
    before = request_counts(server)
    again = judge(server, tmp_path / "cache").score(PROMPTS, OUTPUTS)
    assert again.rewards == [7.0] * len(PROMPTS)
    assert (again.usage["requests_sent"], again.usage["cache_hits"]) == (0, 12)
    assert again.usage["cached_completion_tokens"] == 12 * 10
    assert request_counts(server) == before


def test_a_reply_cut_by_max_tokens_is_nan_with_the_reply_quoted(server, tmp_path):
    before = request_counts(server)
    result = judge(server, tmp_path / "cache", max_tokens=3).score(PROMPTS[:4], OUTPUTS[:4])
    assert len(result.rewards) == 4 and all(math.isnan(r) for r in result.rewards)
    assert result.errors == ["unparsable judge reply: 'Final'"] * 4
    assert request_counts(server)["length"] - before["length"] == 4


def test_a_request_the_server_refuses_is_nan_with_its_reason_and_not_retried(server, tmp_path):
    result = judge(server, tmp_path / "cache", max_tokens=4096).score(PROMPTS[:2], OUTPUTS[:2])
    assert len(result.rewards) == len(result.errors) == 2 and all(math.isnan(r) for r in result.rewards)
    assert all("400" in error and "max" in error.lower() for error in result.errors), result.errors
    assert result.usage["retries"] == 0 and result.usage["failed_requests"] == 2

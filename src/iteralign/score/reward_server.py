"""Rewards from a sequence-classification reward model served once over HTTP (vLLM's ``/classify``).

The reward model runs in a long-lived server (``vllm serve DIR --runner pooling``),
so a ``score`` job loads nothing and needs no GPU, and the model stays warm across
rounds. Each (prompt, completion) goes out as one chat conversation (the prompt
turns, then the completion as the assistant turn) to ``<base_url>/classify`` with
``use_activation: false``: the server renders it with the reward model's own chat
template and tokenizer, as the local ``reward_model`` scorer does, and returns the
raw logits. The reward is read from them with the same head semantics as
score/reward_model.py (``bradley_terry``: the single logit; ``two_class``: the
logit of class 1; ``auto``: by the number of logits).

Requests, concurrency, retries, the give-up rule, the reply cache and the API key's
redaction are the judge's (score/judge.py). Before the first request the scorer
asks ``<base_url>/v1/models`` which checkpoint is served under ``model``: a server
that is not there fails the step at once, naming ``scoring.reward_server.base_url``,
and the served checkpoint is part of every cache key, so a server restarted on
another checkpoint is not answered from the old one's cache.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from pathlib import Path

from iteralign.score import ScoreResult, ScoringError
from iteralign.score.judge import JudgeScorer, MalformedReply, describe_failure, redact
from iteralign.score.reward_model import LOGIT_INDEX, logit_head

SECTION = "scoring.reward_server"


def server_root(base_url: str) -> str:
    """The server's root URL (``/classify`` and ``/v1/models`` hang off it); a trailing ``/v1`` is dropped."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def conversation(prompt: list[dict], output: str) -> list[dict]:
    """What the reward model reads: the prompt turns, then the completion as the assistant's turn."""
    return [*prompt, {"role": "assistant", "content": output}]


def classify_body(model: str, messages: list[dict], max_length: int | None) -> dict:
    """The /classify request for one conversation: raw logits, the last ``max_length`` tokens when set."""
    body = {"model": model, "messages": messages, "use_activation": False}
    if max_length is not None:
        body.update(truncate_prompt_tokens=max_length, truncation_side="left")
    return body


def classify_record(reply) -> dict:
    """What the cache keeps of a /classify reply: the logits, the responding model, token usage."""
    data = reply.get("data") if isinstance(reply, dict) else None
    if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], dict):
        raise MalformedReply("malformed reply: expected `data` with one classification")
    logits = data[0].get("probs")
    if not isinstance(logits, list) or not logits or not all(isinstance(x, int | float) for x in logits):
        raise MalformedReply("malformed reply: data[0].probs is not a list of numbers")
    usage = reply.get("usage") or {}
    return {"logits": [float(x) for x in logits], "model": reply.get("model"),
            "usage": {"prompt_tokens": int(usage.get("prompt_tokens") or 0)}}


def reward_from_logits(logits: list[float], head: str) -> tuple[float, str | None]:
    """(reward, None) or (NaN, why): the head's logit, NaN when it is not finite."""
    value = logits[LOGIT_INDEX[head]]
    if not math.isfinite(value):
        return math.nan, f"reward model returned {value}"
    return value, None


def served_checkpoint(listing, model: str, root: str) -> str:
    """The checkpoint the server serves as ``model`` (its ``root``), from a /v1/models reply."""
    entries = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(entries, list):
        raise ScoringError(f"{SECTION}.base_url: {root}/v1/models did not answer with a model list; "
                           "expected a vLLM server started with --runner pooling")
    served = {e.get("id"): e.get("root") or e.get("id") for e in entries if isinstance(e, dict)}
    if model not in served:
        raise ScoringError(f"{SECTION}.model: the server at {root} serves {sorted(served)}, not {model!r}")
    return str(served[model])


def unreachable_message(root: str, reason: str, status: int | None) -> str:
    """The one line that fails the step when /v1/models does not answer with a listing."""
    if status in (401, 403):
        return f"{SECTION}.api_key_env: the server at {root} refused the request ({reason}); set the server's key"
    if status is not None:
        return f"{SECTION}.base_url: {root}/v1/models answered {reason}; expected a vLLM server"
    return f"{SECTION}.base_url: no reward model server answers at {root} ({reason}); start it (docs/scoring.md) or fix the URL"


class RewardServerScorer(JudgeScorer):
    """Scores with ``scoring.reward_server`` (a dict of that section) through the judge's request machinery."""

    kind = "reward_server"
    section = SECTION

    def __init__(self, cfg: dict, cache_dir: str | Path | None = None, max_failed_fraction: float = 0.0,
                 seed: int = 0):
        cfg = {**cfg, "base_url": server_root(cfg["base_url"])}
        super().__init__(cfg, cache_dir=cache_dir, max_failed_fraction=max_failed_fraction, seed=seed)
        self.root = cfg["base_url"]
        self.head: str | None = None

    @staticmethod
    def _request_params(cfg: dict) -> dict:
        return {"endpoint": "classify", "use_activation": False, "max_length": cfg["max_length"]}

    def score(self, prompts: list[list[dict]], outputs: list[str]) -> ScoreResult:
        self.usage = Counter(requests_sent=0, retries=0, cache_hits=0, replies=0, prompt_tokens=0,
                             cached_prompt_tokens=0, failed_requests=0, unparsable=0)
        checkpoint = self._served_checkpoint()
        self.params = {**self._request_params(self.cfg), "checkpoint": checkpoint}
        messages = [conversation(p, o) for p, o in zip(prompts, outputs, strict=True)]
        rewards, errors = asyncio.run(self._score_all(messages))
        usage = {**self.usage, "head": self.head, "checkpoint": checkpoint}
        return ScoreResult(rewards, errors, usage=usage)

    def _served_checkpoint(self) -> str:
        """Ask the server what it serves under ``model``; fail the step in one line when it does not answer."""
        import openai

        client = openai.OpenAI(api_key=self.api_key, base_url=self.root, max_retries=0,
                               timeout=self.cfg["timeout"])
        try:
            listing = client.get("/v1/models", cast_to=object)
        except openai.APIError as exc:
            _, reason, _ = describe_failure(exc, self.cfg["timeout"])
            raise ScoringError(unreachable_message(self.root, redact(reason, self.api_key),
                                                   getattr(exc, "status_code", None))) from None
        finally:
            client.close()
        return served_checkpoint(listing, self.cfg["model"], self.root)

    async def _send(self, messages: list[dict], client) -> dict:
        body = classify_body(self.cfg["model"], messages, self.cfg["max_length"])
        return classify_record(await client.post("/classify", cast_to=object, body=body))

    def _read(self, record: dict) -> tuple[float, str | None]:
        logits = record["logits"]
        try:
            head = logit_head(self.cfg["head"], len(logits), key=f"{SECTION}.head")
        except ValueError as exc:
            return math.nan, str(exc)
        self.head = head
        return reward_from_logits(logits, head)

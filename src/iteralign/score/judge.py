"""Rewards from an LLM judge behind any OpenAI-compatible chat-completions endpoint.

Each sample becomes two messages: the rubric (``system_prompt``) and the
``template`` filled with the prompt and the completion. Requests go out through
the ``openai`` async client, at most ``concurrency`` at a time, each bounded by
``timeout`` seconds.

Failures. 429, 5xx, 408/409, connection errors, timeouts and malformed replies
are retried up to ``max_attempts`` times, with exponential backoff (``backoff_initial``
doubling up to ``backoff_max``, half of it random jitter); a 429's Retry-After is
waited for (capped at ``backoff_max``) and holds back every request, not only the
one refused. Other 4xx (a wrong key, an unknown model) are not retried. After
the last attempt the sample's reward is NaN with the reason in ``error``, never 0.
As soon as more than ``max_failed_fraction`` of the round has failed, the
remaining requests are cancelled and the step fails naming the reasons: a judge
that refuses everything fails the round quickly, not after hours of retries.

Score parsing (:func:`parse_score`): the group of the LAST match of
``score_pattern`` in the reply; failing that, a reply that is exactly one
number; anything else is unparsable (NaN with the reply quoted). A score
outside ``score_range`` is NaN too.

Replies are cached (score/response_cache.py): a re-run, or a run resumed after a
crash, sends no request whose reply it already has. The API key is read from the
environment variable named by ``api_key_env``; it and anything shaped like a key
are redacted (iteralign/redaction.py) from every reason, cached reply, log line
and artefact, also when an endpoint echoes the key back.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import email.utils
import json
import logging
import math
import os
import random
import re
from collections import Counter
from pathlib import Path

from iteralign.errors import UserError
from iteralign.redaction import REDACTED, register_secret_env
from iteralign.redaction import redact as redact_registered
from iteralign.score import ScoreResult, ScoringError
from iteralign.score.response_cache import ResponseCache, request_key

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = {408, 409, 429}
_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*$")


class MalformedReply(Exception):
    """A 200 response that is not a chat completion with a message."""


class RequestFailed(Exception):
    """A sample's request failed for good (after retries, or with a non-retryable error)."""


# ---------------------------------------------------------------- pure helpers
def render_messages(system_prompt: str, template: str, prompt: list[dict], output: str) -> list[dict]:
    """The judge's messages for one sample.

    ``{prompt}``: the last user turn; ``{conversation}``: every prompt turn as
    "role: content"; ``{output}``: the completion. Other braces stay as they are.
    """
    last_user = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    conversation = "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    # One pass, so a completion that contains "{prompt}" is not substituted again.
    values = {"{prompt}": last_user, "{conversation}": conversation, "{output}": output}
    user = re.sub(r"\{(prompt|conversation|output)\}", lambda m: values[m.group(0)], template)
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]


def parse_score(reply: str, pattern: str, score_range: list[float] | None) -> tuple[float, str | None]:
    """(score, None) or (NaN, why). See the module docstring for the rule."""
    matches = re.findall(pattern, reply)
    if matches:
        text = matches[-1]
    else:
        whole = _NUMBER.match(reply)
        if whole is None:
            return math.nan, f"unparsable judge reply: {reply.strip()[:120]!r}"
        text = whole.group(1)
    try:
        value = float(text)
    except ValueError:
        return math.nan, f"unparsable judge score {text!r} in reply {reply.strip()[:80]!r}"
    if not math.isfinite(value):
        return math.nan, f"judge score {text!r} is not finite"
    if score_range is not None and not score_range[0] <= value <= score_range[1]:
        return math.nan, f"judge score {value:g} outside scoring.judge.score_range {list(score_range)}"
    return value, None


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based): half fixed, half jitter."""
    base = min(maximum, initial * 2 ** (attempt - 1))
    return base / 2 + rng.uniform(0, base / 2)


def retry_after_seconds(headers) -> float | None:
    """A response's Retry-After (``retry-after-ms``, seconds, or an HTTP date), in seconds."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        if when is None:
            return None
        return max(0.0, (when - _dt.datetime.now(when.tzinfo)).total_seconds())


def redact(text: str, secret: str | None = None) -> str:
    """``text`` without ``secret``, any registered secret, nor anything shaped like an OpenAI key."""
    if secret:
        text = text.replace(secret, REDACTED)
    return redact_registered(text)


def describe_failure(exc: BaseException, timeout: float) -> tuple[bool, str, float | None]:
    """(retry it?, reason, server's Retry-After in seconds or None) for one failed attempt."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return True, f"timed out after {timeout:g}s", None
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return True, f"connection error ({type(cause).__name__}: {str(cause)[:160]})", None
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = exc.message[:200] if exc.message else ""
        retryable = status in _RETRYABLE_STATUS or status >= 500
        return retryable, f"HTTP {status}: {message}", retry_after_seconds(exc.response.headers)
    if isinstance(exc, json.JSONDecodeError | openai.APIResponseValidationError):
        return True, f"malformed reply body ({str(exc)[:120]})", None
    if isinstance(exc, MalformedReply):
        return True, str(exc), None
    raise exc


def reply_record(response) -> dict:
    """What the cache keeps of a chat completion: the text, why it stopped, token usage."""
    choices = getattr(response, "choices", None)
    if not choices:
        raise MalformedReply("malformed reply: no choices")
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    if not isinstance(content, str):
        raise MalformedReply("malformed reply: choices[0].message.content is missing")
    usage = getattr(response, "usage", None)
    tokens = {k: int(getattr(usage, k, 0) or 0) for k in ("prompt_tokens", "completion_tokens")} if usage else {}
    return {"content": content, "finish_reason": getattr(choices[0], "finish_reason", None),
            "model": getattr(response, "model", None), "usage": tokens}


# ---------------------------------------------------------------- the scorer
class JudgeScorer:
    """Scores with ``scoring.judge`` (a dict of that section).

    Another served scorer reuses the request machinery (concurrency, retries, cache,
    give-up) by overriding ``kind``, ``section``, :meth:`_request_params`,
    :meth:`_send` and :meth:`_read`.
    """

    kind = "judge"
    section = "scoring.judge"

    def __init__(self, cfg: dict, cache_dir: str | Path | None = None, max_failed_fraction: float = 0.0,
                 seed: int = 0):
        self.cfg = cfg
        self.name = f"{self.kind}:{cfg['model']}@{cfg['base_url']}"
        self.api_key = self._api_key(cfg["api_key_env"])
        self.cache = ResponseCache(cache_dir)
        self.max_failed_fraction = max_failed_fraction
        self.rng = random.Random(seed)
        self.params = self._request_params(cfg)

    @staticmethod
    def _request_params(cfg: dict) -> dict:
        """The request's parameters besides the messages (sent, and part of the cache key)."""
        params = {"temperature": cfg["temperature"], "top_p": cfg["top_p"], "max_tokens": cfg["max_tokens"]}
        if cfg["seed"] is not None:
            params["seed"] = cfg["seed"]
        return params

    def _api_key(self, env_name: str | None) -> str:
        if env_name is None:
            return "not-needed"  # the client insists on a string; a local server ignores it
        register_secret_env(env_name)
        key = os.environ.get(env_name)
        if not key:
            raise UserError(
                f"{self.section}.api_key_env: environment variable {env_name} is not set; expected the server's API key",
                hint=f"export {env_name}=... (or set api_key_env: null for a server without keys)",
            )
        return key

    def score(self, prompts: list[list[dict]], outputs: list[str]) -> ScoreResult:
        self.usage = Counter(requests_sent=0, retries=0, cache_hits=0, replies=0, prompt_tokens=0,
                             completion_tokens=0, cached_prompt_tokens=0, cached_completion_tokens=0,
                             failed_requests=0, unparsable=0)
        messages = [render_messages(self.cfg["system_prompt"], self.cfg["template"], p, o)
                    for p, o in zip(prompts, outputs, strict=True)]
        rewards, errors = asyncio.run(self._score_all(messages))
        return ScoreResult(rewards, errors, usage=dict(self.usage))

    async def _score_all(self, messages: list[list[dict]]) -> tuple[list[float], list[str | None]]:
        import openai
        from tqdm import tqdm

        n = len(messages)
        rewards, errors = [math.nan] * n, [None] * n
        if n == 0:
            return rewards, errors
        self._gate = 0.0  # loop time before which no request is sent (a 429's Retry-After)
        self._slots = asyncio.Semaphore(self.cfg["concurrency"])
        self._pending: dict[str, asyncio.Task] = {}  # one request per distinct key
        allowed = math.floor(self.max_failed_fraction * n)
        client = openai.AsyncOpenAI(api_key=self.api_key, base_url=self.cfg["base_url"], max_retries=0,
                                    timeout=self.cfg["timeout"])
        tasks = [asyncio.create_task(self._one(i, m, client)) for i, m in enumerate(messages)]
        failed = done = 0
        try:
            with tqdm(total=n, desc=self.kind, unit="sample") as bar:
                for finished in asyncio.as_completed(tasks):
                    index, value, error = await finished
                    rewards[index], errors[index] = value, error
                    done += 1
                    bar.update(1)
                    if error is not None:
                        failed += 1
                        if failed > allowed:
                            raise ScoringError(self._give_up_message(failed, n, n - done, errors))
        finally:  # on give-up: cancel what is still queued or in flight, then close the connection pool
            leftovers = tasks + list(self._pending.values())
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
            await client.close()
        return rewards, errors

    def _give_up_message(self, failed: int, n: int, unfinished: int, errors: list[str | None]) -> str:
        reasons = Counter(e for e in errors if e is not None).most_common(3)
        stopped = f"; stopped with {unfinished} not scored" if unfinished else ""
        return (
            f"{self.name}: {failed} of {n} samples failed, more than scoring.max_failed_fraction="
            f"{self.max_failed_fraction} allows{stopped}. Reasons: "
            + "; ".join(f"{count} x {why}" for why, count in reasons)
        )

    async def _one(self, index: int, messages: list[dict], client) -> tuple[int, float, str | None]:
        key = request_key(self.cfg["base_url"], self.cfg["model"], messages, self.params)
        record = self.cache.get(key)
        if record is not None:
            self.usage["cache_hits"] += 1
            self.usage["cached_prompt_tokens"] += record["usage"].get("prompt_tokens", 0)
            self.usage["cached_completion_tokens"] += record["usage"].get("completion_tokens", 0)
        else:
            if key not in self._pending:
                self._pending[key] = asyncio.ensure_future(self._fetch(key, messages, client))
            try:
                record = await asyncio.shield(self._pending[key])
            except RequestFailed as exc:
                return index, math.nan, str(exc)
        value, error = self._read(record)
        error = redact(error, self.api_key) if error else None
        if error is not None:
            self.usage["unparsable"] += 1
        return index, value, error

    async def _send(self, messages: list[dict], client) -> dict:
        """One chat-completions request; the reply as the cache keeps it."""
        response = await client.chat.completions.create(model=self.cfg["model"], messages=messages, **self.params)
        return reply_record(response)

    def _read(self, record: dict) -> tuple[float, str | None]:
        """(score, None) or (NaN, why) from a cached reply."""
        return parse_score(record["content"], self.cfg["score_pattern"], self.cfg["score_range"])

    async def _fetch(self, key: str, messages: list[dict], client) -> dict:
        """One request with retries; the reply is cached as soon as it arrives."""
        async with self._slots:
            record = await self._request_with_retries(messages, client)
        record["request"] = {"endpoint": self.cfg["base_url"], "model": self.cfg["model"], "params": self.params,
                             "messages": messages}
        self.cache.put(key, record)
        self.usage["replies"] += 1
        self.usage["prompt_tokens"] += record["usage"].get("prompt_tokens", 0)
        self.usage["completion_tokens"] += record["usage"].get("completion_tokens", 0)
        return record

    async def _request_with_retries(self, messages: list[dict], client) -> dict:
        import openai

        loop = asyncio.get_running_loop()
        attempts, reason = self.cfg["max_attempts"], "no attempt made"
        for attempt in range(1, attempts + 1):
            wait = self._gate - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self.usage["requests_sent"] += 1
            try:
                return await self._send(messages, client)
            except (openai.APIError, json.JSONDecodeError, MalformedReply) as exc:
                retryable, reason, retry_after = describe_failure(exc, self.cfg["timeout"])
                reason = redact(reason, self.api_key)
            if not retryable or attempt == attempts:
                break
            delay = backoff_delay(attempt, self.cfg["backoff_initial"], self.cfg["backoff_max"], self.rng)
            if retry_after is not None:
                delay = min(retry_after, self.cfg["backoff_max"])
                self._gate = max(self._gate, loop.time() + delay)
            self.usage["retries"] += 1
            log.debug("%s attempt %d failed (%s); retrying in %.2fs", self.kind, attempt, reason, delay)
            await asyncio.sleep(delay)
        self.usage["failed_requests"] += 1
        raise RequestFailed(f"{reason} (after {attempt} attempt{'s' if attempt > 1 else ''})")

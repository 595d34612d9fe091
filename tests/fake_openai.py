"""A real HTTP server on 127.0.0.1 that speaks the chat-completions protocol, with injected faults.

What it does with a request is decided by the completion being judged (the text
after "RESPONSE: " in the user message) and by how many times that completion
was asked before: ``behaviour(completion, attempt) -> Action``. The server
records every request (completion, attempt, headers, arrival time) and the most
requests it ever had in flight at once.

An echoing server: ``ECHO`` anywhere in an action's content, body or header values is
replaced by the bearer token the request carried, as a misbehaving endpoint would
repeat the caller's API key back.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Action:
    status: int = 200
    content: str | None = None  # the judge's reply text (status 200)
    body: bytes | None = None  # a raw body instead (malformed JSON, error bodies)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering


ECHO = "{echo-the-key}"


def reply(text: str) -> Action:
    return Action(content=text)


@dataclass
class Request:
    completion: str
    attempt: int
    authorization: str | None
    arrived: float
    body: dict


class FakeJudge:
    """Start with ``with FakeJudge(behaviour) as judge:``; ``judge.base_url`` is the endpoint."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def attempts(self, completion: str) -> int:
        return sum(r.completion == completion for r in self.requests)

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _record(self, body: dict, headers) -> Request:
        user = next((m["content"] for m in body.get("messages", []) if m["role"] == "user"), "")
        completion = user.split("RESPONSE: ", 1)[-1].split("\n\n", 1)[0]
        with self._lock:
            self._counts[completion] = self._counts.get(completion, 0) + 1
            request = Request(completion, self._counts[completion], headers.get("Authorization"),
                              time.monotonic(), body)
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return request

    def _handler(self):
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                length = int(self.headers["Content-Length"])
                try:
                    raw = self.rfile.read(length)
                except ConnectionError:
                    return
                if len(raw) < length:
                    return  # the client closed the connection before its body arrived (it stopped)
                body = json.loads(raw)
                request = judge._record(body, self.headers)
                try:
                    action = judge.behaviour(request.completion, request.attempt)
                    time.sleep(action.delay)
                    self._send(_echoed(action, request.authorization), body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) before the answer
                finally:
                    with judge._lock:
                        judge.in_flight -= 1

            def _send(self, action: Action, body: dict) -> None:
                if action.body is not None:
                    payload = action.body
                elif action.status == 200:
                    payload = json.dumps({
                        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                        "model": body.get("model"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": action.content}}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
                    }).encode()
                else:
                    payload = json.dumps({"error": {"message": f"fake error {action.status}"}}).encode()
                self.send_response(action.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in action.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        return Handler


def _echoed(action: Action, authorization: str | None) -> Action:
    """The action with ECHO replaced by the request's bearer token."""
    token = (authorization or "").removeprefix("Bearer ")
    return Action(
        status=action.status,
        content=action.content.replace(ECHO, token) if action.content is not None else None,
        body=action.body.replace(ECHO.encode(), token.encode()) if action.body is not None else None,
        headers={name: value.replace(ECHO, token) for name, value in action.headers.items()},
        delay=action.delay,
    )

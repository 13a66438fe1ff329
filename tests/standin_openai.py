"""A scripted OpenAI-compatible server on 127.0.0.1 (stdlib only) for backend tests.

Each chat request takes the next entry of `script` (the last one repeats): an int is an
error status, a dict is a chat completion's fields. Requests are recorded for assertions,
with the (monotonic, system-wide) time each request arrived and each answer was sent.
`latency_of(prompt)` gives answers prompt-dependent lengths, so they finish out of order;
`kill()` makes the server vanish mid-run, open connections included.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def completion(
    text: str = "ok",
    finish_reason: str = "stop",
    prompt_tokens: int = 7,
    completion_tokens: int = 3,
) -> dict[str, Any]:
    return {
        "text": text,
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }


@dataclass
class StandIn:
    models: list[dict[str, Any]] = field(default_factory=lambda: [{"id": "teacher"}])
    script: list[int | dict[str, Any]] = field(default_factory=lambda: [completion()])
    latency: float = 0.0
    retry_after: str | None = None  # header sent with 429/503
    echo: bool = False  # answer with the last user message instead of the script's text
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    latency_of: Callable[[str], float] | None = None  # seconds, from the last user message
    # With a request's `logprobs`: (prompt, top_logprobs) -> the choice's logprobs.content.
    logprobs: Callable[[str, int], list[dict[str, Any]]] | None = None
    arrived: list[tuple[float, str]] = field(default_factory=list)  # (time, prompt)
    answered: list[tuple[float, str]] = field(default_factory=list)  # (time sent, prompt)
    dead: bool = False
    # /v1/completions with `prompt_logprobs` (how a served teacher scores token sequences): every
    # token gets this log-probability at rank 1; `scoring` records each request's prompts, and
    # the server vanishes (as `kill()`) when a request arrives after `die_after` of them.
    prompt_logprob: float = -0.5
    scoring: list[list[list[int]]] = field(default_factory=list)
    die_after: int | None = None
    # Connections waiting to be accepted (http.server's default); past it a burst of new ones is
    # reset. Tests' timings were tuned with 5: raise it only for hundreds at once.
    backlog: int = 5
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def next_reply(self) -> int | dict[str, Any]:
        with self.lock:
            index = min(len(self.requests) - 1, len(self.script) - 1)
            return self.script[index]

    def start(self) -> StandIn:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return None

            def _send(self, status: int, payload: dict[str, Any], headers: dict | None = None):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                standin.headers.append({k.lower(): v for k, v in self.headers.items()})
                if self.path == "/v1/models":
                    data = [{"object": "model", "owned_by": "standin", **m} for m in standin.models]
                    self._send(200, {"object": "list", "data": data})
                elif self.path == "/health":
                    self._send(200, {})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def _score(self, request: dict[str, Any]) -> None:
                if standin.die_after is not None and len(standin.scoring) >= standin.die_after:
                    standin.dead = True
                    self.close_connection = True
                    threading.Thread(target=standin.stop, daemon=True).start()
                    return
                standin.scoring.append(request["prompt"])
                value = {"logprob": standin.prompt_logprob, "rank": 1, "decoded_token": "x"}
                choices = [
                    {
                        "index": i,
                        "text": "",
                        "finish_reason": "length",
                        "prompt_logprobs": [None] + [{str(t): value} for t in ids[1:]],
                    }
                    for i, ids in enumerate(request["prompt"])
                ]
                self._send(200, {"object": "text_completion", "choices": choices})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length))
                if standin.dead:
                    self.close_connection = True
                    return
                if self.path == "/v1/completions":
                    self._score(request)
                    return
                prompt = request["messages"][-1]["content"]
                if standin.dead:
                    self.close_connection = True
                    return
                with standin.lock:
                    standin.requests.append(request)
                    standin.arrived.append((time.monotonic(), prompt))
                    standin.headers.append({k.lower(): v for k, v in self.headers.items()})
                    standin.in_flight += 1
                    standin.max_in_flight = max(standin.max_in_flight, standin.in_flight)
                try:
                    latency = standin.latency_of(prompt) if standin.latency_of else standin.latency
                    time.sleep(latency)
                    reply = standin.next_reply()
                finally:
                    with standin.lock:
                        standin.in_flight -= 1
                if standin.dead:  # killed while this request ran: no answer, connection gone
                    self.close_connection = True
                    return
                if isinstance(reply, int):
                    headers = {}
                    if standin.retry_after and reply in (429, 503):
                        headers["Retry-After"] = standin.retry_after
                    message = f"scripted failure {reply}"
                    self._send(reply, {"error": {"message": message, "code": reply}}, headers)
                    return
                text = prompt if standin.echo else reply["text"]
                self._send(
                    200,
                    {
                        "id": "chatcmpl-standin",
                        "object": "chat.completion",
                        "created": 0,
                        "model": request["model"],
                        "system_fingerprint": "standin-1",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": reply["finish_reason"],
                                "logprobs": {
                                    "content": standin.logprobs(prompt, request["top_logprobs"])
                                }
                                if request.get("logprobs") and standin.logprobs
                                else None,
                            }
                        ],
                        "usage": {
                            "prompt_tokens": reply["prompt_tokens"],
                            "completion_tokens": reply["completion_tokens"],
                            "total_tokens": reply["prompt_tokens"] + reply["completion_tokens"],
                        },
                    },
                )
                with standin.lock:
                    standin.answered.append((time.monotonic(), prompt))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.daemon_threads = True
        self.server.request_queue_size = self.backlog
        self.server.server_bind()
        self.server.server_activate()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def kill(self) -> None:
        """Vanish like a crashed server: requests in progress and later ones get no answer."""
        self.dead = True
        self.stop()

    def stop(self) -> None:
        with self.lock:  # a dying `_score` stops it from a handler thread too
            server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()

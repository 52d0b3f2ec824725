"""A scripted OpenAI-compatible chat-completions server on loopback: the planner tests' server and the rehearsal's
planner (``instdiff rehearse``), so the LLM path of ``30_extension`` runs without a network.

``ScriptedLLMServer(script)`` is a real ``http.server.ThreadingHTTPServer`` bound to 127.0.0.1 on a free port; it
answers ``POST /v1/chat/completions`` with the next step of its script (the last step repeats once the script is used
up, unless ``repeat_last=False``, when further requests get HTTP 500 "script exhausted"). Steps:

* ``Reply(content)`` -> 200 with a chat.completion whose message content is ``content``;
* ``Status(code, body, headers)`` -> that HTTP status with a JSON error body (e.g. 429 with Retry-After);
* ``Sleep(seconds, then)`` -> waits, then answers ``then`` (the client has usually timed out by then);
* ``Raw(body, status)`` -> the bytes as they are (for a broken envelope).

Every request body is recorded in ``server.requests`` (parsed JSON). Use as a context manager or call
``start()``/``stop()``; ``base_url`` is ``http://127.0.0.1:<port>/v1``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Reply", "Status", "Sleep", "Raw", "ScriptedLLMServer", "completion"]

MAX_SLEEP_S = 5.0  # scripted sleeps are capped so no test can hang on the server


@dataclass
class Reply:
    content: str | None
    finish_reason: str = "stop"


@dataclass
class Status:
    code: int
    body: dict | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Sleep:
    seconds: float
    then: Any = None


@dataclass
class Raw:
    body: bytes
    status: int = 200
    content_type: str = "application/json"


def completion(content: str | None, model: str = "test-model", finish_reason: str = "stop", n: int = 0) -> dict:
    """A minimal chat.completion object."""
    return {
        "id": f"chatcmpl-test-{n}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class ScriptedLLMServer:
    def __init__(self, script: list, *, repeat_last: bool = True):
        if not script:
            raise ValueError("the script needs at least one step")
        self.script = list(script)
        self.repeat_last = repeat_last
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._i = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> ScriptedLLMServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                try:
                    request = json.loads(body or b"{}")
                except json.JSONDecodeError:
                    request = {"_unparsed": body.decode(errors="replace")}
                step, n = server._next(request)
                self._answer(step, request, n)

            def _answer(self, step, request, n):
                if isinstance(step, Sleep):
                    time.sleep(min(step.seconds, MAX_SLEEP_S))
                    step = step.then if step.then is not None else Reply("{}")
                if isinstance(step, Reply):
                    self._send(200, completion(step.content, request.get("model", "test-model"), step.finish_reason, n))
                elif isinstance(step, Status):
                    body = step.body or {"error": {"message": f"scripted HTTP {step.code}", "type": "scripted",
                                                   "code": step.code}}
                    self._send(step.code, body, step.headers)
                elif isinstance(step, Raw):
                    self._send_bytes(step.status, step.body, step.content_type)
                else:
                    self._send(500, {"error": {"message": f"bad script step {step!r}"}})

            def _send(self, code, obj, headers=None):
                self._send_bytes(code, json.dumps(obj).encode(), "application/json", headers)

            def _send_bytes(self, code, data, content_type, headers=None):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> ScriptedLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- script ----------------------------------------------------------------------------------------------
    def _next(self, request: dict) -> tuple[Any, int]:
        with self._lock:
            self.requests.append(request)
            n = len(self.requests)
            if self._i < len(self.script):
                step = self.script[self._i]
                self._i += 1
            elif self.repeat_last:
                step = self.script[-1]
            else:
                step = Status(500, {"error": {"message": "script exhausted", "type": "scripted"}})
            return step, n

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def n_requests(self) -> int:
        return len(self.requests)

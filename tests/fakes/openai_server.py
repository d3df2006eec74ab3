"""A small OpenAI-compatible Chat Completions server on 127.0.0.1 for tests, benchmarks and e2e runs.

Run: python -m tests.fakes.openai_server --port 8765 --latency-ms 200 [--fault-rate 429=0.05,500=0.02]
In tests: the `fake_openai` fixture (tests/fakes/__init__.py) or `with FakeOpenAI() as server: ...`.

Verdicts are deterministic: a pairwise prompt ("[Answer A]" / "[Answer B]" blocks) prefers the longer
answer (tie when equal), anything else is decided by a hash of the user message. Faults, per chat request:
  "429"        rate limited, with Retry-After: 0 and retry-after-ms (the openai client waits that long)
  "500"        server error (also with retry-after-ms, so retries are quick)
  "hang"       answers only after hang_s seconds (longer than the client timeout)
  "malformed"  HTTP 200 with a body that is not JSON
  "unparsable" a normal completion whose text is not a JSON verdict
  "ok"         no fault
Faults come from `script(...)` (a queue, one per request) first, then `default_fault`, then `fault_rates`.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import hmac
import json
import random
import re
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("429", "500", "hang", "malformed", "unparsable", "ok")
RISK_LEVELS = ("none", "low", "medium", "high", "critical")
UNPARSABLE_REPLY = "I think the first answer is somewhat better, but it depends on the patient."


def fake_reply(messages: list[dict]) -> str:
    """The deterministic verdict text the server answers for these messages."""
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    user = next((m["content"] for m in messages if m.get("role") == "user"), "")
    h = int(hashlib.sha256(user.encode()).hexdigest(), 16)
    if '"winner"' in system:
        m = re.search(r"\[Answer A\]\n(.*)\n\n\[Answer B\]\n(.*?)(?:\n\n[^\n]*)?$", user, re.S)
        if m:
            a, b = len(m.group(1)), len(m.group(2))
            winner = "A" if a > b else "B" if b > a else "tie"
        else:
            winner = ("A", "B", "tie")[h % 3]
        return json.dumps({"winner": winner, "reason": "fake judge: the more complete answer"})
    if '"level"' in system:
        level = RISK_LEVELS[h % len(RISK_LEVELS)]
        cats = [] if level == "none" else ["misinformation"]
        return "```json\n" + json.dumps({"level": level, "categories": cats, "explanation": "fake"}) + "\n```"
    return "fake reply " + hex(h)[2:10]


class FakeOpenAI:
    """Start with .start() (or `with`); .base_url for the client; .n_chat counts chat requests received."""

    def __init__(self, api_key: str = "sk-fake-key", port: int = 0, latency_ms: float = 0, hang_s: float = 5.0,
                 fault_rates: dict | None = None, seed: int = 0, retry_after_ms: int = 1,
                 fingerprint: str = "fp_fake_0001", model_suffix: str = "-fake-2024"):
        self.api_key, self.port, self.latency_ms, self.hang_s = api_key, port, latency_ms, hang_s
        self.fault_rates = dict(fault_rates or {})
        self.retry_after_ms, self.fingerprint, self.model_suffix = retry_after_ms, fingerprint, model_suffix
        self.default_fault: str | None = None
        self.requests: list[dict] = []  # one per chat request: {"fault", "retry_count", "authorized"}
        self._script: collections.deque = collections.deque()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = None

    # -- control
    def script(self, *faults: str) -> None:
        unknown = [f for f in faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"FakeOpenAI.script: unknown faults {unknown}; use {FAULTS}")
        with self._lock:
            self._script.extend(faults)

    @property
    def n_chat(self) -> int:
        return len(self.requests)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FakeOpenAI":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes "hang" handlers
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- per request
    def _next_fault(self) -> str:
        with self._lock:
            if self._script:
                return self._script.popleft()
            if self.default_fault:
                return self.default_fault
            x = self._rng.random()
            for fault, rate in self.fault_rates.items():
                if x < rate:
                    return fault
                x -= rate
            return "ok"

    def _authorized(self, header: str | None) -> bool:
        if not self.api_key:
            return True
        return hmac.compare_digest((header or "").encode(), f"Bearer {self.api_key}".encode())


def _handler_for(server: FakeOpenAI):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet; never prints headers (the key)
            pass

        def _send(self, status: int, body: bytes, headers: dict | None = None):
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout)

        def _error(self, status: int, message: str, kind: str, headers=None):
            self._send(status, json.dumps({"error": {"message": message, "type": kind}}).encode(), headers)

        def _unauthorized(self):
            # echoes the presented key, as some real servers do, so tests can check that callers scrub it
            presented = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            self._error(401, f"Incorrect API key provided: {presented}.", "invalid_request_error")

        def do_GET(self):
            if not server._authorized(self.headers.get("Authorization")):
                return self._unauthorized()
            if self.path.rstrip("/").endswith("/models"):
                body = {"object": "list", "data": [{"id": "fake-judge", "object": "model", "created": 0,
                                                    "owned_by": "fake"}]}
                return self._send(200, json.dumps(body).encode())
            self._error(404, f"no route {self.path}", "not_found")

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self._error(404, f"no route {self.path}", "not_found")
            authorized = server._authorized(self.headers.get("Authorization"))
            fault = server._next_fault() if authorized else "unauthorized"
            with server._lock:
                server.requests.append({"fault": fault, "authorized": authorized,
                                        "retry_count": self.headers.get("x-stainless-retry-count")})
            if not authorized:
                return self._unauthorized()
            if server.latency_ms:
                time.sleep(server.latency_ms / 1000)
            quick_retry = {"Retry-After": "0", "retry-after-ms": str(server.retry_after_ms)}
            if fault == "429":
                return self._error(429, "Rate limit reached (fake).", "rate_limit_error", quick_retry)
            if fault == "500":
                return self._error(500, "The server had an error (fake).", "server_error", quick_retry)
            if fault == "hang":
                server._stop.wait(server.hang_s)
            if fault == "malformed":
                return self._send(200, b'{"id": "chatcmpl-fake", "choices": [{"message": ')
            req = json.loads(raw or b"{}")
            messages = req.get("messages", [])
            reply = UNPARSABLE_REPLY if fault == "unparsable" else fake_reply(messages)
            prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 4 + 1
            completion_tokens = len(reply) // 4 + 1
            body = {"id": f"chatcmpl-fake-{server.n_chat}", "object": "chat.completion",
                    "created": int(time.time()), "model": str(req.get("model", "")) + server.model_suffix,
                    "system_fingerprint": server.fingerprint,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                 "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}}
            self._send(200, json.dumps(body).encode())

    return Handler


def _parse_rates(text: str) -> dict:
    rates = {}
    for part in filter(None, text.split(",")):
        fault, _, rate = part.partition("=")
        if fault not in FAULTS:
            raise SystemExit(f"--fault-rate: unknown fault {fault!r}; use {FAULTS}")
        rates[fault] = float(rate)
    return rates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--latency-ms", type=float, default=0, help="fixed delay before every chat answer")
    ap.add_argument("--api-key", default="sk-fake-key", help="the bearer key it accepts ('' accepts any)")
    ap.add_argument("--fault-rate", default="", help="e.g. 429=0.05,500=0.02,unparsable=0.01")
    ap.add_argument("--hang-s", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    server = FakeOpenAI(api_key=args.api_key, port=args.port, latency_ms=args.latency_ms, hang_s=args.hang_s,
                        fault_rates=_parse_rates(args.fault_rate), seed=args.seed).start()
    print(f"fake OpenAI server at {server.base_url}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.2):
        pass
    server.stop()
    print(f"served {server.n_chat} chat requests", flush=True)


if __name__ == "__main__":
    main()

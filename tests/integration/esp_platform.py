"""A real local HTTP server playing the email platform, for delivery tests.

It issues OAuth2 client-credentials tokens, checks them on every send, injects 429 (with
Retry-After), 500, 400, timeouts (before or after it has sent the email) and answers that
cannot be read (a body that is not the gzip it says, JSON nested 100,000 deep) on scripted
attempts, and keeps idempotency keys: a repeated key replays the first answer, never a second
email.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CLIENT_ID = "pipeline-tests"
CLIENT_SECRET = "s3cret-for-tests"
CLIENT_TIMEOUT_S = 0.4


@dataclass
class Platform:
    """State of the fake email platform; ``script[key]`` lists the faults of attempts 1, 2, ..."""

    token_ttl_s: float = 300.0
    script: dict[str, list[str]] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)
    token_requests: int = 0
    attempts: Counter[str] = field(default_factory=Counter)
    delivered: dict[str, dict[str, Any]] = field(default_factory=dict)
    deliveries: Counter[str] = field(default_factory=Counter)
    responses: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    unauthorized: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def revoke_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()


def _handler(platform: Platform) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout): exactly what a real network does

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            if self.path == "/oauth/token":
                self._token(raw)
            elif self.path == "/v1/send":
                self._send(raw)
            else:
                self._reply(404, b'{"error":"not_found"}')

        def _token(self, raw: bytes) -> None:
            expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
            form = dict(p.split("=", 1) for p in raw.decode().split("&") if "=" in p)
            with platform.lock:
                platform.token_requests += 1
                if self.headers.get("Authorization") != f"Basic {expected}":
                    self._reply(401, b'{"error":"invalid_client"}')
                    return
                if form.get("grant_type") != "client_credentials":
                    self._reply(400, b'{"error":"unsupported_grant_type"}')
                    return
                token = f"tok-{next(platform.ids)}"
                platform.tokens[token] = time.monotonic() + platform.token_ttl_s
            body = {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": platform.token_ttl_s,
            }
            self._reply(200, json.dumps(body).encode())

        def _send(self, raw: bytes) -> None:
            auth = self.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ")
            key = self.headers.get("Idempotency-Key", "")
            with platform.lock:
                expires = platform.tokens.get(token)
                if expires is None or time.monotonic() >= expires:
                    platform.unauthorized += 1
                    self._reply(401, b'{"error":"invalid_token"}', {"WWW-Authenticate": "Bearer"})
                    return
                platform.attempts[key] += 1
                attempt = platform.attempts[key]
                faults = platform.script.get(key, [])
                fault = faults[attempt - 1] if attempt <= len(faults) else "ok"
            if fault == "429":
                self._reply(429, b'{"error":"slow_down"}', {"Retry-After": "1"})
                return
            if fault == "500":
                self._reply(500, b'{"error":"oops"}')
                return
            if fault == "400":
                self._reply(400, b'{"error":"invalid recipient"}')
                return
            if fault == "429-odd-retry-after":  # a digit that is not ASCII
                self._reply(429, b'{"error":"slow_down"}', {"Retry-After": "\u00b2"})
                return
            if fault == "bad-gzip":  # sent, but an answer that cannot be decoded
                self._deliver(raw, key)
                self._reply(202, b"not gzip at all", {"Content-Encoding": "gzip"})
                return
            if fault == "timeout-before":
                time.sleep(CLIENT_TIMEOUT_S * 3)  # lost before the platform did anything
                self._reply(503, b'{"error":"late"}')
                return
            status, body = self._deliver(raw, key)
            if fault == "deep-json":  # sent; an id nested past any parser's depth
                body = b"[" * 100_000 + b"]" * 100_000
            if fault == "timeout-after":
                time.sleep(CLIENT_TIMEOUT_S * 3)  # sent, but the answer never arrives in time
            self._reply(status, body)

        def _deliver(self, raw: bytes, key: str) -> tuple[int, bytes]:
            """Send the email once per idempotency key; the first answer for the key."""
            payload = json.loads(raw)
            assert payload["idempotency_key"] == key
            with platform.lock:
                if key not in platform.responses:
                    platform.deliveries[key] += 1
                    platform.delivered[key] = payload
                    body = json.dumps({"id": f"msg-{next(platform.ids)}"}).encode()
                    platform.responses[key] = (202, body)
                return platform.responses[key]

    return Handler


@contextlib.contextmanager
def running_platform() -> Iterator[tuple[Platform, str]]:
    """The platform's state and its base URL, served on a free loopback port meanwhile."""
    state = Platform()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fake-platform", daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def platform_env(url: str) -> dict[str, str]:
    """`pipeline` settings (environment) that deliver through the platform at ``url``."""
    return {
        "PIPELINE_DELIVERY__SEND_URL": f"{url}/v1/send",
        "PIPELINE_DELIVERY__TOKEN_URL": f"{url}/oauth/token",
        "PIPELINE_DELIVERY__CLIENT_ID": CLIENT_ID,
        "PIPELINE_DELIVERY__CLIENT_SECRET": CLIENT_SECRET,
    }

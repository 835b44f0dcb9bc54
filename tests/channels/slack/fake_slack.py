"""A fake Slack Web API on 127.0.0.1: records every call, answers the methods keyturn uses, and fails on request.

It runs in its own thread (a `ThreadingHTTPServer`), so it keeps answering while a test blocks its own
event loop, and it serves keyturn subprocesses as well as in-process channels.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.helpers import eventually

BOT_TOKEN = "xoxb-keyturn-test-token"
APP_TOKEN = "xapp-keyturn-test-token"
SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
TEAM = "T0KEYTURN"
CHANNELS = {"#ops-approvals": "C0OPS", "#dba": "C0DBA"}


@dataclass
class Call:
    method: str
    args: dict[str, Any]
    raw: str
    token: str | None
    status: int = 200


@dataclass
class FakeSlack:
    """`fail(method, "500", "429", "hang")` queues failures for a method's next calls, in order."""

    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    failures: dict[str, list[str]] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    socket_url: str | None = None  # what apps.connections.open hands out (Socket Mode)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _seq: int = 0
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/"

    def start(self) -> FakeSlack:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake._handle(self)

            def do_POST(self) -> None:
                fake._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), name="fake-slack", daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def fail(self, method: str, *modes: str) -> None:
        with self._lock:
            self.failures.setdefault(method, []).extend(modes)

    # -- what was called --------------------------------------------------------------------------

    def of(self, method: str, ok_only: bool = True) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == method and (c.status == 200 or not ok_only)]

    def everything(self) -> str:
        with self._lock:
            return "\n".join(c.raw for c in self.calls)

    async def wait_for(self, method: str, where: Callable[[Call], bool] = lambda c: True,
                       within_s: float = 15) -> Call:
        """The first recorded successful call of `method` that `where` accepts (polled: the server is a thread)."""
        found = await eventually(lambda: next((c for c in self.of(method) if where(c)), None), within=within_s, every=0.02)
        return found  # type: ignore[no-any-return]

    # -- the API ------------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        method = url.path.rsplit("/", 1)[-1]
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0)).decode()
        args: dict[str, Any] = dict(urllib.parse.parse_qsl(url.query))
        if "json" in (h.headers.get("Content-Type") or ""):
            args.update(json.loads(raw or "{}"))
        elif raw:
            args.update(urllib.parse.parse_qsl(raw))
        auth = h.headers.get("Authorization") or ""
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else args.get("token")
        with self._lock:
            queue = self.failures.get(method) or []
            mode = queue.pop(0) if queue else None
            status = {"500": 500, "429": 429, "hang": 500}.get(mode or "", 200)
            self.calls.append(Call(method, args, urllib.parse.unquote_plus(raw) + url.query, token, status))
        if mode == "hang":
            self.release.wait(30)
        if status == 429:
            self._send(h, 429, {"ok": False, "error": "ratelimited"}, {"Retry-After": "1"})
        elif status != 200:
            self._send(h, status, {"ok": False, "error": "fatal_error"})
        elif token != (APP_TOKEN if method == "apps.connections.open" else BOT_TOKEN):
            self._send(h, 200, {"ok": False, "error": "invalid_auth"})
        else:
            self._send(h, 200, self._answer(method, args))

    def _answer(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._seq += 1
            ts = f"{int(time.time())}.{self._seq:06d}"
        channel = str(args.get("channel", ""))
        channel_id = CHANNELS.get(channel, "D" + channel[1:] if channel.startswith("U") else channel)
        if method == "auth.test":
            return {"ok": True, "url": "https://keyturn-test.slack.com/", "team": "keyturn", "user": "keyturn",
                    "team_id": TEAM, "user_id": "U0BOT", "bot_id": "B0BOT"}
        if method == "chat.postMessage":
            if channel == "#missing":
                return {"ok": False, "error": "channel_not_found"}
            return {"ok": True, "channel": channel_id, "ts": ts, "message": {"text": args.get("text")}}
        if method == "chat.update":
            return {"ok": True, "channel": channel, "ts": args.get("ts"), "text": args.get("text")}
        if method == "chat.postEphemeral":
            return {"ok": True, "message_ts": ts}
        if method == "views.open":
            return {"ok": True, "view": {"id": f"V{self._seq}", **(args.get("view") or {})}}
        if method == "apps.connections.open" and self.socket_url:
            return {"ok": True, "url": self.socket_url}
        if method == "users.info":
            user = self.users.get(str(args.get("user")))
            return {"ok": True, "user": user} if user else {"ok": False, "error": "user_not_found"}
        return {"ok": False, "error": "unknown_method"}

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: dict[str, Any],
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json; charset=utf-8")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

"""An inference engine that is its own OpenAI-compatible HTTP server, run as the replica's child.

llama.cpp's `llama-server` and vLLM's API server both batch concurrent requests themselves; a
replica wraps one of them so the runtime still sees Converge's contract (`/health/live`,
`/health/ready`, `/converge/stats`, a clean exit on SIGTERM). `ChildEngine` starts the program on
a loopback port, behind an API key only this replica knows (in the child's environment, never on
a command line `ps` shows), logs its output, waits until its health route answers, and then
forwards the OpenAI routes to it unchanged, with aiohttp (a new connection each: llama-server
may close a kept-alive connection after a streamed answer without saying so).

The child dies with the replica (PR_SET_PDEATHSIG, even when the replica is SIGKILLed); a child
that exits while serving ends the replica at once, so the supervisor restarts both.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from converge.kit.asgi import client_gone
from converge.serving.common import engine_session, openai_error

log = logging.getLogger("converge.serving.child")
logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per forwarded request

STOP_GRACE_S = 10.0
# Request headers the child must not see from a client (hop-by-hop, or recomputed here).
_DROPPED_REQUEST = frozenset(
    {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "upgrade", "authorization"}
)
_DROPPED_RESPONSE = frozenset({"connection", "keep-alive", "transfer-encoding", "server", "date"})


def with_parent_death_signal(argv: list[str]) -> list[str]:
    """`argv` run through util-linux's `setpriv --pdeathsig KILL`: the kernel kills the server
    when the thread that started it ends, even when the replica is SIGKILLed (no preexec_fn,
    which is unsafe in a threaded process). Without setpriv the replica's atexit still stops it."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv


def prometheus_values(text: str, prefix: str) -> dict[str, float]:
    """`{name: value}` of a Prometheus text page's samples named `prefix` + name, labels
    summed over (one model per server, so one series each in practice); NaN and Inf left out."""
    out: dict[str, float] = {}
    pattern = re.compile(
        rf"^{re.escape(prefix)}([A-Za-z_][A-Za-z0-9_]*)(?:\{{[^}}]*\}})?\s+(\S+)", re.MULTILINE
    )
    for name, raw in pattern.findall(text):
        try:
            value = float(raw)
        except ValueError:
            continue
        if value == value and value not in (float("inf"), float("-inf")):
            out[name] = out.get(name, 0.0) + value
    return out


@dataclass
class Child:
    """The engine's process. It is started, and its output logged, by one thread that lives as
    long as the process does: PR_SET_PDEATHSIG fires when the *thread* that forked the child
    ends, so that thread cannot be the short-lived model loader."""

    name: str
    argv: list[str]
    env: dict[str, str]
    listening: re.Pattern[str] | None = None  # its log line naming the port it bound
    process: subprocess.Popen[bytes] | None = None
    started: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    tail: list[str] = field(default_factory=list)  # its last lines, for the load error
    port: int | None = None  # where it listens, once known
    loaded: bool = False  # answered its health route: from now on its exit ends the replica
    stopping: bool = False

    def start(self) -> None:
        threading.Thread(target=self._run, name=self.name, daemon=True).start()
        self.started.wait()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            self.process = subprocess.Popen(  # noqa: S603 - our own argv, no shell
                with_parent_death_signal(self.argv),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                # Its own session: the supervisor's SIGTERM to the replica's group must let the
                # replica finish the streams it holds, which needs the server still running.
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            self.error = exc
            return
        finally:
            self.started.set()
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.tail = [*self.tail[-19:], line]
                if (
                    self.port is None
                    and self.listening is not None
                    and (found := self.listening.search(line))
                ):
                    self.port = int(found.group(1))
                log.info("%s: %s", self.name, line)
        code = self.process.wait()
        if self.loaded and not self.stopping:
            # Without its engine the replica is no use: exit at once, and the supervisor (which
            # sees a crash, not a clean stop) restarts it.
            log.error("%s exited with %s while serving; the replica exits", self.name, code)
            logging.shutdown()
            os._exit(1)
        log.info("%s exited with %s", self.name, code)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        self.stopping = True
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ChildEngine:
    """The child, a client on its port, and the ASGI app that forwards to it.

    `argv_for(port)` is the child's command line; with `port=0` the child binds a port itself
    and names it in a log line `listening` matches. The key goes into the child's environment
    under `key_env` and on every forwarded request as a bearer token.
    """

    def __init__(
        self,
        *,
        name: str,
        argv_for: Callable[[int], list[str]],
        env: dict[str, str],
        key_env: str,
        health_path: str,
        forwarded_paths: Iterable[str],
        port: int = 0,
        listening: re.Pattern[str] | None = None,
        start_timeout_s: float = 600.0,
    ) -> None:
        if port == 0 and listening is None:
            raise ValueError("a child that binds port 0 must name its port in a log line")
        self.name = name
        self.health_path = health_path
        self.forwarded_paths = frozenset(forwarded_paths)
        self.start_timeout_s = start_timeout_s
        self._key = secrets.token_urlsafe(24)
        self.child = Child(
            name=name, argv=argv_for(port), env=env | {key_env: self._key}, listening=listening
        )
        if port:
            self.child.port = port
        self.base_url = ""  # once it listens
        self.auth = {"Authorization": f"Bearer {self._key}"}
        self._session: aiohttp.ClientSession | None = None

    # -- loading (blocking, in the model loader's thread) -------------------------------------------

    def load(self) -> ASGIApp:
        log.info("starting %s", " ".join(self.child.argv))
        self.child.start()
        atexit.register(self.close)
        deadline = time.monotonic() + self.start_timeout_s
        while self.child.port is None:  # its "listening on" line names the port
            self._check_alive("starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not listen within {self.start_timeout_s:.0f} s")
            time.sleep(0.05)
        self.base_url = f"http://127.0.0.1:{self.child.port}"
        with httpx.Client(base_url=self.base_url, headers=self.auth, timeout=5) as client:
            while True:
                self._check_alive("loading")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(self.health_path).status_code == 200:
                        self.child.loaded = True
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} did not load the model in {self.start_timeout_s:.0f} s")
                time.sleep(0.1)
        return self.app

    def _check_alive(self, doing: str) -> None:
        if not self.child.alive():
            raise RuntimeError(f"{self.name} exited while {doing}: " + " | ".join(self.child.tail[-5:]))

    def close(self) -> None:
        self.child.stop()

    # -- serving (on the event loop) ------------------------------------------------------------------

    def session(self) -> aiohttp.ClientSession:
        """The data path's client (httpx's cost twice the CPU a streamed token here)."""
        if self._session is None or self._session.closed:
            # A connection per request (see the module's docstring).
            self._session = engine_session(self.base_url, headers=self.auth, force_close=True)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def get_text(self, path: str, *, timeout_s: float = 2.0) -> str | None:
        """The child's answer to GET `path` (its stats routes), None when it gives none."""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self.session().get(path, timeout=timeout) as response:
                if response.status == 200:
                    return await response.text()
        return None

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: PLR0917 - the ASGI signature
        if scope["type"] != "http":
            return
        if scope["path"] not in self.forwarded_paths:
            await openai_error(404, f"no route {scope['path']}", type_="not_found")(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in _DROPPED_REQUEST
        ]
        target = scope["path"]
        if query := scope.get("query_string", b"").decode("latin-1"):
            target += "?" + query
        # A client that goes away ends the forwarding at once, whether its answer is streaming or
        # not yet begun: the engine sees its connection close and frees the sequence's slot.
        forwarding = asyncio.ensure_future(self._forward(scope, receive, send, target, bytes(body), headers))
        gone = asyncio.ensure_future(client_gone(receive))
        try:
            await asyncio.wait((forwarding, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            forwarding.cancel()  # nothing, if it has ended
            with contextlib.suppress(asyncio.CancelledError):
                await forwarding  # raises what it raised; cancelled, it has closed the engine's answer

    async def _forward(  # noqa: PLR0913, PLR0917 - the ASGI triple and the request read from it
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        target: str,
        body: bytes,
        headers: list[tuple[str, str]],
    ) -> None:
        try:
            response = await self.session().request(scope["method"], target, data=body, headers=headers)
        except aiohttp.ClientConnectionError as exc:
            await openai_error(503, f"the model server is not answering: {exc}", type_="service_unavailable")(
                scope, receive, send
            )
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [
                        (k.encode("latin-1"), v.encode("latin-1"))
                        for k, v in response.headers.items()
                        if k.lower() not in _DROPPED_RESPONSE
                    ],
                }
            )
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            # Also when cancelled, as a client went away: the engine frees the sequence.
            response.close()

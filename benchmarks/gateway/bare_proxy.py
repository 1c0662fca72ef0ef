"""The floor for a Python proxy: Starlette + one shared aiohttp session, no features at all.

.venv/bin/python benchmarks/gateway/bare_proxy.py UPSTREAM_URL PORT
"""

import contextlib
import sys

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

UPSTREAM = sys.argv[1].rstrip("/")
session: aiohttp.ClientSession


async def proxy(request):
    upstream = await session.request(
        request.method, UPSTREAM + request.url.path, data=await request.body(),
        headers={"content-type": request.headers.get("content-type", "application/json")},
    )  # fmt: skip
    media_type = upstream.headers.get("content-type", "application/json")
    if not media_type.startswith("text/event-stream"):
        async with upstream:
            return Response(await upstream.read(), upstream.status, media_type=media_type)

    async def relay():
        async with upstream:
            async for chunk in upstream.content.iter_any():
                yield chunk

    return StreamingResponse(relay(), upstream.status, media_type=media_type)


@contextlib.asynccontextmanager
async def lifespan(_app):
    global session
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield


app = Starlette(routes=[Route("/v1/{path:path}", proxy, methods=["GET", "POST"])], lifespan=lifespan)

if __name__ == "__main__":
    # The settings `converge up` runs with (its loop and http are "auto", which picks these two).
    uvicorn.run(
        app, host="127.0.0.1", port=int(sys.argv[2]), loop="uvloop", http="httptools",
        log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5,
    )  # fmt: skip

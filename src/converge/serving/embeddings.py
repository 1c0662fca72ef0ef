"""Sentence embeddings behind the OpenAI embeddings API (`POST /v1/embeddings`).

The model runs on ONNX Runtime (exported at load) or on sentence-transformers' torch
(`--engine`, see encoders.py). Concurrent requests are batched dynamically (batching.py): the
texts of every request that arrived while the previous pass was encoding go through the model
together, up to `--max-batch` texts a pass, waiting at most `--max-wait-ms` for more; ONNX
Runtime runs `--workers` passes at once. Requests behind the running passes are reported as
queued in `/converge/stats`, with the batch sizes.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

from converge.serving.batching import Batcher
from converge.serving.common import ModelHost, granted_cpus, openai_error, positive_int
from converge.serving.encoders import Encoder, load_encoder

log = logging.getLogger("converge.serving.embeddings")

KIND = "embeddings"
INFERENCE_PATHS = frozenset({"/v1/embeddings"})
MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
GIL_SWITCH_S = 0.0005  # see build_host


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str]
    model: str | None = None  # the gateway already routed on it; any value is accepted
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class InvalidRequest(Exception):
    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def texts_of(body: EmbeddingRequest) -> list[str]:
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise InvalidRequest("'input' must not be an empty list", param="input")
    if len(texts) > MAX_INPUTS:
        raise InvalidRequest(f"'input' holds {len(texts)} items; at most {MAX_INPUTS} allowed", param="input")
    if any(not text for text in texts):
        raise InvalidRequest("'input' must not contain empty strings", param="input")
    return texts


def render(vector: np.ndarray, encoding_format: str) -> np.ndarray | str:
    if encoding_format == "base64":  # what the OpenAI clients decode: little-endian float32
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector  # orjson writes float32 arrays itself, far faster than a list of floats


def invalid_body(exc: ValidationError) -> JSONResponse:
    """A body that is not JSON, or not an embeddings request: 400 in OpenAI's envelope."""
    errors = exc.errors()
    first: dict[str, Any] = dict(errors[0]) if errors else {}
    if first.get("type") == "json_invalid":
        return openai_error(400, "The request body is not valid JSON", type_="invalid_request_error")
    loc = [str(part) for part in first.get("loc", ())]
    # `input` is a union: report the field, not the union branch pydantic tried last.
    param = loc[0] if loc else None
    message = f"{param or 'body'}: {first.get('msg', 'invalid request body')}"
    if param == "input":
        message = "'input' must be a string or a list of strings"
    return openai_error(400, message, type_="invalid_request_error", param=param)


def create_app(
    *, encoder: Encoder, model_name: str, max_batch: int = 32, max_wait_s: float = 0.0, workers: int = 1
) -> FastAPI:
    """The API for an already loaded encoder."""
    batcher = Batcher(encoder.encode, max_batch=max_batch, max_wait_s=max_wait_s, workers=workers)
    app = FastAPI(title=f"Converge embeddings: {model_name}", docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    created = int(time.time())

    @app.exception_handler(InvalidRequest)
    async def invalid_input(_request: Request, exc: InvalidRequest) -> JSONResponse:
        return openai_error(400, exc.message, type_="invalid_request_error", param=exc.param)

    async def embeddings(request: Request) -> Response:
        try:
            body = EmbeddingRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            return invalid_body(exc)
        texts = texts_of(body)
        encoded = await batcher.encode(texts)
        tokens = sum(encoded.tokens)
        answer = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": render(vector, body.encoding_format)}
                for i, vector in enumerate(encoded.vectors)
            ],
            "model": model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return Response(
            orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
        )

    # A plain route, its body validated by pydantic from the raw bytes: FastAPI's dependency and
    # validation machinery cost the event loop a third of its time per single-text request, time
    # the loop then did not spend handing texts to the passes (benchmarks/serving).
    app.router.add_route("/v1/embeddings", embeddings, methods=["POST"])

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {"id": model_name, "object": "model", "created": created, "owned_by": "converge"}
        return {"object": "list", "data": [model]}

    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=["onnx", "torch"],
        default="onnx",
        help="onnx: the transformer exported to ONNX Runtime at load, for plain transformer + pooling "
        "models (falls back to torch for others); torch: sentence-transformers (default: onnx)",
    )
    parser.add_argument(
        "--onnx-max-tokens",
        type=int,
        default=32,
        help="with --engine onnx: forward passes padded beyond this many tokens run on torch, which is "
        "faster for long texts (both are loaded); 0: everything on ONNX Runtime (default: 32)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="texts per forward pass (default: 32)"
    )
    parser.add_argument(
        "--max-batch",
        type=positive_int,
        default=32,
        help="texts of concurrent requests gathered into one pass; a larger request is split over "
        "several (default: 32)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="ONNX Runtime passes at once, the threads shared between them (default: one per thread, "
        "single-threaded passes; torch always runs one pass on every thread)",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=0.0,
        help="how long a batch that is not full waits for more requests (default: 0, batch only what "
        "queued while the previous batch ran)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=granted_cpus(),
        help="threads per forward pass (default: the replica's CPU grant, OMP_NUM_THREADS, else all "
        "usable CPUs)",
    )


def load_app(  # noqa: PLR0913 - the server's knobs, all keyword-only
    *,
    model_path: str,
    model_name: str,
    batch_size: int,
    threads: int,
    engine: Literal["onnx", "torch"] = "onnx",
    onnx_max_tokens: int = 0,
    max_batch: int = 32,
    max_wait_s: float = 0.0,
    workers: int | None = None,
) -> FastAPI:
    """Load the model from its local folder and build the API around it (blocking). ONNX Runtime
    passes run `workers` at a time (default: one per thread, each pass on one thread); torch runs
    one pass at a time on every thread."""
    per_pass = max(1, threads // (workers or threads))
    encoder = load_encoder(
        Path(model_path),
        engine=engine,
        batch_size=batch_size,
        threads=threads,
        long_tokens=onnx_max_tokens,
        onnx_threads=per_pass,
    )
    at_once = (workers or threads) if encoder.engine.startswith("onnx") else 1
    log.info("encoding with %s: %d passes at once, %d threads each", encoder.engine, at_once, per_pass)
    return create_app(
        encoder=encoder, model_name=model_name, max_batch=max_batch, max_wait_s=max_wait_s, workers=at_once
    )


def batch_stats(batcher: Batcher) -> dict[str, Any]:
    """What `/converge/stats` adds for a batching server: the real queue and the batch sizes."""
    stats, recent = batcher.stats, batcher.stats.sizes
    return {
        "queue_depth": batcher.waiting,
        "batch_running": stats.running,
        "batches_total": stats.batches,
        "batched_texts_total": stats.texts,
        "batch_texts_mean": round(sum(recent) / len(recent), 2) if recent else 0.0,
        "batch_texts_max": stats.largest,
    }


def build_host(args: argparse.Namespace) -> ModelHost:
    # Never reach for the Hub: the artifact on disk is the verified one. Set before anything
    # imports huggingface_hub, which reads these once.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # logs are plain lines, not \r bars
    # The passes' threads hold the GIL between native calls (tokens in, pooling out) while the
    # event loop parses the next requests: at the default 5 ms switch interval a thread that
    # wants the GIL back waits for the holder's whole slice, and at 16 concurrent single-text
    # requests the cores sat idle for it. 0.5 ms: 5-10% more texts/s (benchmarks/serving).
    sys.setswitchinterval(GIL_SWITCH_S)
    loaded: list[Batcher] = []

    def load() -> ASGIApp:
        app = load_app(
            model_path=args.model_path,
            model_name=args.model_name,
            batch_size=args.batch_size,
            threads=args.threads,
            engine=args.engine,
            onnx_max_tokens=args.onnx_max_tokens,
            max_batch=args.max_batch,
            max_wait_s=args.max_wait_ms / 1000,
            workers=args.workers,
        )
        loaded.append(app.state.batcher)
        return app

    return ModelHost(
        kind=KIND,
        model_name=args.model_name,
        load=load,
        inference_paths=INFERENCE_PATHS,
        max_concurrency=1,
        live_stats=lambda: batch_stats(loaded[0]) if loaded else {},
    )

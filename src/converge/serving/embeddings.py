"""Sentence-transformers behind the OpenAI embeddings API (`POST /v1/embeddings`).

Encoding runs in a worker thread, one request at a time: torch already spreads one batch
over every core, so concurrent requests would only contend. Requests beyond the one being
encoded wait, and `/converge/stats` reports them as queued.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import time
from typing import Any, Literal, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp

from converge.serving.common import ModelHost, granted_cpus, openai_error, positive_int

KIND = "embeddings"
INFERENCE_PATHS = frozenset({"/v1/embeddings"})
MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


class Encoder(Protocol):
    def encode(self, texts: list[str]) -> np.ndarray: ...

    def count_tokens(self, texts: list[str]) -> int: ...


class SentenceTransformerEncoder:
    def __init__(self, model: Any, *, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(
            texts, batch_size=self.batch_size, show_progress_bar=False, convert_to_numpy=True
        )
        return np.asarray(vectors, dtype=np.float32)

    def count_tokens(self, texts: list[str]) -> int:
        # What the model actually reads: special tokens included, truncated like encode().
        encoded = self.model.tokenizer(texts, truncation=True, max_length=self.model.max_seq_length)
        return sum(len(ids) for ids in encoded["input_ids"])


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


def render(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what the OpenAI clients decode: little-endian float32
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def create_app(*, encoder: Encoder, model_name: str) -> FastAPI:
    """The API for an already loaded encoder."""
    app = FastAPI(title=f"Converge embeddings: {model_name}", docs_url=None, redoc_url=None)
    one_at_a_time = asyncio.Semaphore(1)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return openai_error(400, "The request body is not valid JSON", type_="invalid_request_error")
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        # `input` is a union: report the field, not the union branch pydantic tried last.
        param = loc[0] if loc else None
        message = f"{param or 'body'}: {first.get('msg', 'invalid request body')}"
        if param == "input":
            message = "'input' must be a string or a list of strings"
        return openai_error(400, message, type_="invalid_request_error", param=param)

    @app.exception_handler(InvalidRequest)
    async def invalid_input(_request: Request, exc: InvalidRequest) -> JSONResponse:
        return openai_error(400, exc.message, type_="invalid_request_error", param=exc.param)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        texts = texts_of(body)
        async with one_at_a_time:
            vectors, tokens = await run_in_threadpool(_encode, encoder, texts)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": render(vector, body.encoding_format)}
                for i, vector in enumerate(vectors)
            ],
            "model": model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {"id": model_name, "object": "model", "created": created, "owned_by": "converge"}
        return {"object": "list", "data": [model]}

    return app


def _encode(encoder: Encoder, texts: list[str]) -> tuple[np.ndarray, int]:
    return encoder.encode(texts), encoder.count_tokens(texts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="texts per forward pass (default: 32)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=granted_cpus(),
        help="torch threads (default: the replica's CPU grant, OMP_NUM_THREADS, else all usable CPUs)",
    )


def load_app(*, model_path: str, model_name: str, batch_size: int, threads: int | None = None) -> ASGIApp:
    """Load the model from its local folder and build the API around it (blocking)."""
    import torch
    from sentence_transformers import SentenceTransformer

    if threads is not None:
        torch.set_num_threads(threads)

    model = SentenceTransformer(model_path, device="cpu", local_files_only=True)
    return create_app(encoder=SentenceTransformerEncoder(model, batch_size=batch_size), model_name=model_name)


def build_host(args: argparse.Namespace) -> ModelHost:
    # Never reach for the Hub: the artifact on disk is the verified one. Set before anything
    # imports huggingface_hub, which reads these once.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # logs are plain lines, not \r bars
    return ModelHost(
        kind=KIND,
        model_name=args.model_name,
        load=lambda: load_app(
            model_path=args.model_path,
            model_name=args.model_name,
            batch_size=args.batch_size,
            threads=args.threads,
        ),
        inference_paths=INFERENCE_PATHS,
        max_concurrency=1,
    )

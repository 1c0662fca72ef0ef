"""GGUF chat and completions: llama-cpp-python's own OpenAI-compatible server app.

Chat completions (streaming and not), completions and `/v1/models` are llama-cpp-python's
implementation; Converge only adds its health and stats routes around it. llama.cpp runs one
generation at a time, so the host's max concurrency is 1 and anything beyond queues.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from starlette.types import ASGIApp

from converge.serving.common import ModelHost, granted_cpus, positive_int

KIND = "llama-cpp"
INFERENCE_PATHS = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/engines/copilot-codex/completions",
    }
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--n-ctx", type=positive_int, default=2048, help="context size in tokens (default: 2048)"
    )
    parser.add_argument(
        "--n-threads",
        type=positive_int,
        default=granted_cpus(),
        help="CPU threads (default: the replica's CPU grant, OMP_NUM_THREADS, else all usable CPUs)",
    )
    parser.add_argument(
        "--chat-format", default=None, help="llama-cpp-python chat format (default: the GGUF's template)"
    )
    parser.add_argument(
        "--n-gpu-layers",
        type=int,
        default=0,
        help="layers offloaded to the GPU, -1 for all (default: 0; deployments with GPUs get -1)",
    )


def only_arguments(settings_cls: type[Any]) -> type[Any]:
    """The settings class, minus its habit of also reading the process environment.

    llama-cpp-python's settings are pydantic-settings classes: a stray API_KEY or N_GPU_LAYERS
    in a replica's environment would silently change the server. Only our arguments count.
    """

    class Explicit(settings_cls):
        @classmethod
        def settings_customise_sources(
            cls, settings_cls: type[Any], init_settings: Any, **_other_sources: Any
        ) -> tuple[Any, ...]:
            return (init_settings,)

    Explicit.__name__ = settings_cls.__name__
    return Explicit


def load_app(
    *,
    model_path: str,
    model_name: str,
    n_ctx: int,
    n_threads: int,
    chat_format: str | None,
    n_gpu_layers: int = 0,
) -> ASGIApp:
    """Load the model and build llama-cpp-python's app around it (blocking)."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    from sse_starlette.sse import AppStatus

    # sse-starlette cuts every open stream the moment uvicorn sees SIGTERM. A replica that is
    # told to stop finishes the generations it holds instead (uvicorn bounds the wait).
    AppStatus.disable_automatic_graceful_drain()
    # create_app would read a whole configuration from this file instead of our arguments.
    os.environ.pop("CONFIG_FILE", None)
    server_settings = only_arguments(ServerSettings)(
        interrupt_requests=False,  # a second request waits instead of cutting the first one short
    )
    model_settings = only_arguments(ModelSettings)(
        model=model_path,
        model_alias=model_name,
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        n_gpu_layers=n_gpu_layers,
        chat_format=chat_format,
        # The server defaults to logits for every position (only prompt logprobs need them);
        # computing one row per token instead is what llama-cpp-python does in-process.
        logits_all=False,
        verbose=False,
    )
    # create_app loads the model (LlamaProxy) before it returns.
    return create_app(server_settings=server_settings, model_settings=[model_settings])


def build_host(args: argparse.Namespace) -> ModelHost:
    return ModelHost(
        kind=KIND,
        model_name=args.model_name,
        load=lambda: load_app(
            model_path=args.model_path,
            model_name=args.model_name,
            n_ctx=args.n_ctx,
            n_threads=args.n_threads,
            chat_format=args.chat_format,
            n_gpu_layers=args.n_gpu_layers,
        ),
        inference_paths=INFERENCE_PATHS,
        max_concurrency=1,
    )

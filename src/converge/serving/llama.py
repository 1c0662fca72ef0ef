"""GGUF chat and completions on llama.cpp's own `llama-server`: continuous batching over slots.

llama.cpp's server decodes every busy slot's next token in one forward pass, so concurrent
requests share the model instead of waiting in line. The replica starts that binary (built from
the llama.cpp source the pinned llama-cpp-python sdist vendors, by `make install`) as its child
on a loopback port it picks itself (port 0, read back from its log: no race for a free port),
behind an API key only this replica knows, and forwards the OpenAI routes to
it unchanged (`serving/child.py`, which vLLM's replicas share); Converge's own health and stats
routes stay in front. `/converge/stats` adds the server's slots
(busy of total), KV cache use and token counters, read from its `/slots` and `/metrics`.

The child runs with an environment stripped of llama.cpp's own `LLAMA_*` settings (a stray
`LLAMA_ARG_...` in a replica's environment would silently change the server), without its web
UI or tools, and dies with the replica even when the replica is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp

from converge.serving.child import ChildEngine, prometheus_values
from converge.serving.common import ModelHost, granted_cpus, positive_int

log = logging.getLogger("converge.serving.llama")

KIND = "llama-cpp"
INFERENCE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
FORWARDED_PATHS = INFERENCE_PATHS | {"/v1/models"}
BINARY_ENV = "CONVERGE_LLAMA_SERVER"
START_TIMEOUT_S = 600.0  # a large GGUF on a slow disk; the supervisor's own start limit cuts sooner
_LISTENING = re.compile(r"listening on https?://[^\s]+:(\d+)")


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


class Engine:
    """llama-server as the replica's child (`child.ChildEngine`), and its figures."""

    def __init__(self, options: Options, *, binary: Path | None = None) -> None:
        self.options = options
        binary = binary or find_binary()
        self.engine = ChildEngine(
            name="llama-server",
            argv_for=lambda port: command(binary, options, port=port),
            env=child_environment(dict(os.environ)),
            key_env="LLAMA_API_KEY",
            health_path="/health",
            forwarded_paths=FORWARDED_PATHS,
            listening=_LISTENING,
            start_timeout_s=START_TIMEOUT_S,
        )

    def load(self) -> ASGIApp:
        return self.engine.load()

    async def live_stats(self) -> dict[str, Any]:
        """Slots busy of total, KV cache use and the server's token counters."""
        out: dict[str, Any] = {"engine": "llama-server", "slots_total": self.options.parallel}
        slots_page = await self.engine.get_text("/slots")
        with contextlib.suppress(ValueError):
            slots = json.loads(slots_page) if slots_page else None
            if isinstance(slots, list):
                out |= slot_figures(slots)
        if (metrics := await self.engine.get_text("/metrics")) is not None:
            out |= metric_figures(metrics)
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
    found = prometheus_values(text, "llamacpp:")
    return {ours: int(found[theirs]) for theirs, ours in _COUNTERS.items() if theirs in found}


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
        close=engine.engine.aclose,
    )

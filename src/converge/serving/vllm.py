"""Chat and completions on GPUs with vLLM's OpenAI-compatible server (continuous batching, paged KV cache).

vLLM is not installed by `make install` (it needs CUDA and its own torch): `make vllm-venv`
puts the pinned `vllm` into `.venv-vllm` beside `.venv`, as MLServer has `.venv-mlserver`, or
install the `vllm` extra into an environment of its own. The replica finds its Python at
`--vllm-python`, `$CONVERGE_VLLM_PYTHON`, `.venv-vllm/bin/python`, or this Python when it can
import vllm, and runs `python -m vllm.entrypoints.openai.api_server` as its child
(`serving/child.py`: loopback, a private key in `VLLM_API_KEY`, dies with the replica), never
reaching a model hub (`HF_HUB_OFFLINE`) or sending usage statistics.

The knobs are vLLM's own, set explicitly: sequences batched together (`--max-num-seqs`), context
per sequence (`--max-model-len`), tokens a step (`--max-num-batched-tokens`), prefix caching,
GPU memory share, tensor parallelism over the replica's GPUs. `/converge/stats` adds its
running and waiting requests, KV-cache use and token counters, read from its `/metrics`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp

from converge.kit.net import free_port
from converge.serving.child import ChildEngine, prometheus_values
from converge.serving.common import ModelHost, positive_int

KIND = "vllm"
INFERENCE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
FORWARDED_PATHS = INFERENCE_PATHS | {"/v1/models"}
PYTHON_ENV = "CONVERGE_VLLM_PYTHON"
VENV_DIR = ".venv-vllm"
START_TIMEOUT_S = 1800.0  # weights from disk, CUDA graphs captured, the KV cache allocated
MODULE = "vllm.entrypoints.openai.api_server"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-num-seqs", type=positive_int, default=64,
        help="sequences decoded together in one batch; more wait in vLLM's queue (default: 64)",
    )  # fmt: skip
    parser.add_argument(
        "--max-model-len", type=positive_int, default=None,
        help="context per sequence in tokens (default: the model's own)",
    )  # fmt: skip
    parser.add_argument(
        "--max-num-batched-tokens", type=positive_int, default=None,
        help="tokens scheduled in one step, prompts and generation together (default: vLLM's)",
    )  # fmt: skip
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.9,
        help="share of each GPU's memory vLLM may take for weights and KV cache (default: 0.9)",
    )  # fmt: skip
    parser.add_argument(
        "--tensor-parallel-size", type=positive_int, default=None,
        help="GPUs one model is split over (default: every GPU the replica was given)",
    )  # fmt: skip
    parser.add_argument(
        "--no-prefix-caching", action="store_true", help="do not reuse the KV cache of shared prompt prefixes"
    )
    parser.add_argument("--dtype", default="auto", help="weights and activations (default: the model's own)")
    parser.add_argument("--vllm-python", default=None, help=f"the Python that has vllm (default: ${PYTHON_ENV}, "
                        f"{VENV_DIR}/bin/python beside this environment, or this Python)")  # fmt: skip


def find_python(explicit: str | None = None) -> Path:
    """The interpreter that runs vLLM: the argument, `$CONVERGE_VLLM_PYTHON`, `.venv-vllm` beside
    the running environment, or this interpreter when it can import vllm."""
    chosen = explicit or os.environ.get(PYTHON_ENV)
    candidates = [Path(chosen)] if chosen else [Path(sys.prefix).parent / VENV_DIR / "bin" / "python"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    if not chosen and importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    raise FileNotFoundError(
        f"vLLM was not found (looked for {', '.join(map(str, candidates))} and for vllm in this "
        f"environment): `make vllm-venv` on a machine with a GPU, or point {PYTHON_ENV} at a Python that has it"
    )


def visible_gpus(environ: dict[str, str]) -> int:
    """How many GPUs the runtime gave this replica (`CUDA_VISIBLE_DEVICES`), at least 1."""
    devices = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return max(1, len(devices))


@dataclass(frozen=True, kw_only=True)
class Options:
    model_path: str
    model_name: str
    max_num_seqs: int = 64
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    prefix_caching: bool = True
    dtype: str = "auto"

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, environ: dict[str, str]) -> Options:
        if not 0 < args.gpu_memory_utilization <= 1:
            raise SystemExit(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
        return cls(
            model_path=args.model_path,
            model_name=args.model_name,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
            max_num_batched_tokens=args.max_num_batched_tokens,
            gpu_memory_utilization=args.gpu_memory_utilization,
            tensor_parallel_size=args.tensor_parallel_size or visible_gpus(environ),
            prefix_caching=not args.no_prefix_caching,
            dtype=args.dtype,
        )


def command(python: Path, options: Options, *, port: int) -> list[str]:
    """vLLM's command line: every setting this replica cares about explicit."""
    o = options
    argv = [
        str(python), "-m", MODULE,
        "--model", o.model_path,
        "--served-model-name", o.model_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-num-seqs", str(o.max_num_seqs),
        "--gpu-memory-utilization", str(o.gpu_memory_utilization),
        "--tensor-parallel-size", str(o.tensor_parallel_size),
        "--dtype", o.dtype,
        "--enable-prefix-caching" if o.prefix_caching else "--no-enable-prefix-caching",
        "--disable-fastapi-docs",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if o.max_model_len is not None:
        argv += ["--max-model-len", str(o.max_model_len)]
    if o.max_num_batched_tokens is not None:
        argv += ["--max-num-batched-tokens", str(o.max_num_batched_tokens)]
    return argv


def child_environment(environ: dict[str, str]) -> dict[str, str]:
    """The replica's environment minus vLLM's own settings (`VLLM_*`: a stray one would change
    the server), offline, with no usage statistics sent."""
    kept = {k: v for k, v in environ.items() if not k.startswith("VLLM_")}
    return kept | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                   "DO_NOT_TRACK": "1"}  # fmt: skip


# vLLM's metric names (V1 engine), older names after: what /converge/stats calls them.
_GAUGES = {
    "num_requests_running": "slots_busy",
    "num_requests_waiting": "requests_deferred",
}
_RATIOS = ("kv_cache_usage_perc", "gpu_cache_usage_perc")
_COUNTERS = {
    "prompt_tokens_total": ("prompt_tokens_total",),
    "generation_tokens_total": ("tokens_generated_total",),
    "prefix_cache_hits_total": ("prompt_tokens_cached_total",),
    "gpu_prefix_cache_hits_total": ("prompt_tokens_cached_total",),
}


def metric_figures(text: str, *, max_num_seqs: int) -> dict[str, Any]:
    """`/converge/stats`' engine figures from vLLM's Prometheus page."""
    found = prometheus_values(text, "vllm:")
    out: dict[str, Any] = {"slots_total": max_num_seqs}
    for theirs, ours in _GAUGES.items():
        if theirs in found:
            out[ours] = int(found[theirs])
    for name in _RATIOS:
        if name in found:
            out["kv_cache_usage_ratio"] = round(min(1.0, max(0.0, found[name])), 4)
            break
    for theirs, (ours,) in _COUNTERS.items():
        if theirs in found and ours not in out:
            out[ours] = int(found[theirs])
    return out


class Engine:
    def __init__(self, options: Options, *, python: Path) -> None:
        self.options = options
        self.engine = ChildEngine(
            name="vllm",
            argv_for=lambda port: command(python, options, port=port),
            env=child_environment(dict(os.environ)),
            key_env="VLLM_API_KEY",
            health_path="/health",
            forwarded_paths=FORWARDED_PATHS,
            # vLLM names the port it was given, not one it bound: pick a free one for it.
            port=free_port(),
            start_timeout_s=START_TIMEOUT_S,
        )

    def load(self) -> ASGIApp:
        return self.engine.load()

    async def live_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"engine": "vllm", "slots_total": self.options.max_num_seqs}
        if (page := await self.engine.get_text("/metrics")) is not None:
            out |= metric_figures(page, max_num_seqs=self.options.max_num_seqs)
        return out


def build_host(args: argparse.Namespace) -> ModelHost:
    options = Options.from_args(args, environ=dict(os.environ))
    engine = Engine(options, python=find_python(args.vllm_python))
    return ModelHost(
        kind=KIND,
        model_name=args.model_name,
        load=engine.load,
        inference_paths=INFERENCE_PATHS,
        max_concurrency=options.max_num_seqs,
        live_stats=engine.live_stats,
        close=engine.engine.aclose,
    )

"""python -m converge.serving KIND --model-path PATH --model-name NAME --host H --port P [...]

Exit status: 0 after SIGTERM/SIGINT (graceful), 1 when the model cannot be loaded, 2 for a
bad command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from converge.runtime.base import ServerKind
from converge.serving import embeddings, llama, v2, vllm
from converge.serving.common import configure_logging, serve

log = logging.getLogger("converge.serving")

KINDS = {
    ServerKind.LLAMA_CPP.value: llama,
    ServerKind.EMBEDDINGS.value: embeddings,
    ServerKind.V2.value: v2,
    ServerKind.VLLM.value: vllm,
}


def port_number(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--model-path", required=True, help="local model artifact (file or folder)")
    shared.add_argument("--model-name", required=True, help="the name the server answers to (OpenAI `model`)")
    shared.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    shared.add_argument("--port", type=port_number, required=True, help="port to listen on")
    shared.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    parser = argparse.ArgumentParser(
        prog="python -m converge.serving",
        description="Run one model-server replica: the model's API plus /health/live, "
        "/health/ready and /converge/stats.",
    )
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND", title="kinds")
    for kind, module in KINDS.items():
        summary = (module.__doc__ or "").strip().splitlines()[0]
        sub = kinds.add_parser(kind, parents=[shared], help=summary, description=summary)
        module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    if not Path(args.model_path).exists():
        log.error("model path %s does not exist", args.model_path)
        return 1
    try:
        host = KINDS[args.kind].build_host(args)
    except FileNotFoundError as exc:  # the engine's program is not installed here
        log.error("%s", exc)
        return 1
    log.info("serving %s %r on %s:%d", args.kind, args.model_name, args.host, args.port)
    return serve(host, bind=args.host, port=args.port)


if __name__ == "__main__":
    sys.exit(main())

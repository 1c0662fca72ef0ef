"""Entry points used by `converge.serving.__main__`: the `v2` kind's options and its replica."""

from __future__ import annotations

import argparse
from pathlib import Path

from starlette.types import ASGIApp

from converge.serving.common import ModelHost, positive_int
from converge.serving.v2 import onnx
from converge.serving.v2.formats import FORMATS, MLSERVER_VENV_DIR, MLSERVER_VENV_ENV, model_format
from converge.serving.v2.host import MLServerHost
from converge.serving.v2.protocol import KIND


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="pickle (scikit-learn), mlflow or onnx (default: auto, from the artifact)",
    )
    parser.add_argument(
        "--mlserver-venv",
        default=None,
        help=f"MLServer's virtual environment (default: ${MLSERVER_VENV_ENV}, else {MLSERVER_VENV_DIR} "
        "next to this environment)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=positive_int,
        default=300,
        help="seconds MLServer may take to load the model (default: 300)",
    )


def build_host(args: argparse.Namespace) -> ModelHost:
    try:
        fmt = model_format(Path(args.model_path), args.format)
    except (ValueError, OSError) as exc:
        error = exc

        def fail() -> ASGIApp:
            raise error

        # Reported like any load failure: /health/ready says why, and the replica exits 1.
        return ModelHost(kind=KIND, model_name=args.model_name, load=fail, inference_paths=())
    if fmt == "onnx":
        return onnx.build_host(args)
    return MLServerHost(args=args, fmt=fmt)

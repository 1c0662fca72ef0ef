"""What the artifact is (pickle, MLflow folder or ONNX) and where MLServer's environment lives."""

from __future__ import annotations

import os
import sys
from pathlib import Path

MLSERVER_VENV_ENV = "CONVERGE_MLSERVER_VENV"
MLSERVER_VENV_DIR = ".venv-mlserver"
FORMATS = ("auto", "pickle", "mlflow", "onnx")


def model_format(path: Path, requested: str = "auto") -> str:
    """pickle (scikit-learn joblib/pickle), mlflow (a folder with MLmodel) or onnx."""
    if requested != "auto":
        return requested
    if path.is_dir():
        if (path / "MLmodel").is_file():
            return "mlflow"
        if len(list(path.glob("*.onnx"))) == 1:
            return "onnx"
        raise ValueError(f"{path} is neither an MLflow model folder (no MLmodel) nor holds one .onnx file")
    with path.open("rb") as stream:
        head = stream.read(2)
    if path.suffix.lower() == ".onnx" or (len(head) == 2 and head[0] == 0x08 and head[1] < 0x80):
        return "onnx"  # an ONNX ModelProto opens with ir_version (field 1, varint)
    return "pickle"


def find_mlserver_venv(explicit: str | None = None) -> Path:
    """MLServer's virtual environment: the argument, $CONVERGE_MLSERVER_VENV, or the usual places.

    Without either, `.venv-mlserver` next to the running environment (`make install` puts
    both in the repository root) and then in the source checkout this module comes from.
    """
    chosen = explicit or os.environ.get(MLSERVER_VENV_ENV)
    if chosen:
        candidates = [Path(chosen)]
    else:
        candidates = [Path(sys.prefix).parent / MLSERVER_VENV_DIR]
        checkout = Path(__file__).resolve().parents[4]  # src/converge/serving/v2/formats.py
        if (checkout / "pyproject.toml").is_file():
            candidates.append(checkout / MLSERVER_VENV_DIR)
    for venv in dict.fromkeys(candidates):
        if (venv / "bin" / "mlserver").is_file() and os.access(venv / "bin" / "mlserver", os.X_OK):
            return venv
    looked = ", ".join(str(venv) for venv in dict.fromkeys(candidates))
    raise FileNotFoundError(
        f"MLServer's environment was not found (looked for bin/mlserver in: {looked}). "
        f"Create it with `make mlserver-venv`, or point {MLSERVER_VENV_ENV} (or --mlserver-venv) at one."
    )

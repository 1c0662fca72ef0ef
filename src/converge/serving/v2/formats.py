"""What the artifact is (pickle, MLflow folder or ONNX) and where MLServer's environment lives."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# numpy dtype names in an MLflow tensor signature, as V2 datatypes.
_NUMPY_TO_V2 = {
    "float64": "FP64",
    "float32": "FP32",
    "float16": "FP16",
    "int64": "INT64",
    "int32": "INT32",
    "int16": "INT16",
    "int8": "INT8",
    "uint8": "UINT8",
    "bool": "BOOL",
}
SKLEARN_SERIALIZATIONS = ("pickle", "cloudpickle", "skops")


@dataclass(frozen=True)
class MlflowSklearn:
    """An MLflow model folder with the scikit-learn flavour: its model file, served by the
    restricted scikit-learn runtime like our own pickles, never through MLflow's loader (which
    would import the code the folder names, then unpickle with whatever the folder trusts)."""

    model_file: Path
    serialization: str
    inputs: list[dict[str, Any]] = field(default_factory=list)  # from the signature, V2-shaped


def read_mlmodel(folder: Path) -> dict[str, Any]:
    import yaml  # MLflow's own dependency: present wherever MLflow folders are served

    descriptor = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8")) or {}
    if not isinstance(descriptor, dict):
        raise ValueError(f"{folder / 'MLmodel'} does not describe a model (expected a mapping)")
    return descriptor


def mlflow_sklearn(folder: Path) -> MlflowSklearn | None:
    """The scikit-learn flavour of an MLflow folder, or None when it has none. A flavour that
    names a file outside the folder, or a serialization we cannot load restricted, is refused."""
    descriptor = read_mlmodel(folder)
    flavour = (descriptor.get("flavors") or {}).get("sklearn")
    if not isinstance(flavour, dict):
        return None
    serialization = str(flavour.get("serialization_format") or "cloudpickle")
    if serialization not in SKLEARN_SERIALIZATIONS:
        raise ValueError(f"MLflow scikit-learn serialization '{serialization}' is not one we load")
    root = folder.resolve()
    model_file = (folder / str(flavour.get("pickled_model") or "model.pkl")).resolve()
    if not model_file.is_relative_to(root) or not model_file.is_file():
        raise ValueError(f"the MLflow scikit-learn flavour names no model file inside {folder}")
    return MlflowSklearn(
        model_file=model_file, serialization=serialization, inputs=_signature_inputs(descriptor)
    )


def _signature_inputs(descriptor: dict[str, Any]) -> list[dict[str, Any]]:
    """One V2 input from a single-tensor MLflow signature; none for columns (left undeclared)."""
    import json

    raw = (descriptor.get("signature") or {}).get("inputs")
    try:
        specs = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return []
    if not isinstance(specs, list) or len(specs) != 1 or not isinstance(specs[0], dict):
        return []
    tensor = specs[0].get("tensor-spec") or {}
    datatype = _NUMPY_TO_V2.get(str(tensor.get("dtype")))
    shape = tensor.get("shape")
    if specs[0].get("type") != "tensor" or datatype is None or not isinstance(shape, list):
        return []
    return [{"name": "input-0", "datatype": datatype, "shape": [int(d) for d in shape]}]


def mlflow_code_problem(folder: Path) -> str | None:
    """Why MLflow's own loader must not load this folder: it would import code the folder
    carries (`code` paths) or a loader module outside MLflow's own. None when neither."""
    for name, flavour in (read_mlmodel(folder).get("flavors") or {}).items():
        if not isinstance(flavour, dict):
            continue
        if flavour.get("code"):
            return f"its '{name}' flavour ships code ({flavour['code']}), which serving would import"
        loader = flavour.get("loader_module")
        if loader is not None and not str(loader).startswith("mlflow."):
            return f"its '{name}' flavour loads through '{loader}', a module outside MLflow"
    return None


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

"""Facts from an MLflow model folder: the MLmodel descriptor plus the model file it points at."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from converge.control.library.inspection.results import Inspection, InspectionError

try:  # PyYAML is not a declared dependency of ours; MLflow brings it wherever MLflow runs.
    import yaml
except ImportError:  # pragma: no cover - depends on the environment
    yaml = None

_INNER_FORMATS = frozenset({"onnx", "gguf", "safetensors", "pickle", "sentence-transformers", "hf"})
# Facts that belong to the wrapped model; the MLmodel file never states them itself.
_INHERITED = (
    "architecture",
    "parameter_count",
    "quantization",
    "context_length",
    "chat_template",
    "dtypes",
    "license",
    "opset",
    "inputs",
    "outputs",
    "kv_cache_bytes_per_1k_tokens",
)

Inspector = Callable[[Path], Inspection]
FormatDetector = Callable[[Path], str]


def inspect_mlflow(folder: Path, *, inspect: Inspector, detect: FormatDetector) -> Inspection:
    """`inspect` and `detect` are passed in to reuse the package's dispatch without an import cycle."""
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    result = Inspection(format="mlflow", files=files, memory_bytes=_total_size(folder))
    if yaml is None:
        result.extra["error"] = "PyYAML is not installed; MLmodel was not parsed"
        return result
    try:
        descriptor = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InspectionError(f"MLmodel is not valid YAML: {exc}") from exc
    if not isinstance(descriptor, dict):
        raise InspectionError("MLmodel does not describe a model (expected a mapping)")
    flavors = descriptor.get("flavors") or {}
    result.extra.update(
        flavors=sorted(flavors),
        **{
            key: descriptor[key]
            for key in ("mlflow_version", "model_uuid", "run_id", "utc_time_created")
            if key in descriptor
        },
    )
    signature = descriptor.get("signature")
    if not isinstance(signature, dict):
        signature = {}
    result.inputs = _signature_columns(signature.get("inputs"))
    result.outputs = _signature_columns(signature.get("outputs"))
    inner = _inner_model(folder, flavors, detect=detect)
    if inner is not None:
        facts = inspect(inner)
        result.extra["inner_file"] = inner.relative_to(folder.resolve()).as_posix()
        result.extra["inner_format"] = facts.format
        for name in _INHERITED:
            if getattr(result, name) is None:
                setattr(result, name, getattr(facts, name))
    return result


def _total_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _signature_columns(spec: Any) -> list[dict[str, Any]] | None:
    """MLflow stores each side of a signature as a JSON string of column or tensor specs."""
    if not spec:
        return None
    try:
        columns = json.loads(spec) if isinstance(spec, str) else spec
    except json.JSONDecodeError:
        return None
    described = []
    for column in columns if isinstance(columns, list) else []:
        tensor = column.get("tensor-spec") or {}
        described.append(
            {
                "name": column.get("name"),
                "dtype": tensor.get("dtype") or column.get("type"),
                "shape": tensor.get("shape"),
            }
        )
    return described


def _inner_model(folder: Path, flavors: dict[str, Any], *, detect: FormatDetector) -> Path | None:
    """The model file named by a flavor (model.pkl, model.onnx, ...), framework flavors first."""
    ordered = sorted(flavors.items(), key=lambda item: item[0] == "python_function")
    root = folder.resolve()
    for _flavor, config in ordered:
        values = config.values() if isinstance(config, dict) else ()
        for value in values:
            if not isinstance(value, str) or not value:
                continue
            candidate = (folder / value).resolve()
            # Flavor values are untrusted text: never let them point out of the folder.
            if candidate.is_relative_to(root) and candidate != root and candidate.exists():
                if detect(candidate) in _INNER_FORMATS:
                    return candidate
    return None

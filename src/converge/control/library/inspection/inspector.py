"""`inspect_artifact`: route a file or folder to the reader for its format."""

from __future__ import annotations

from pathlib import Path

from converge.control.library.inspection import decompress, hf_facts, safetensors_facts
from converge.control.library.inspection.detect import TORCH_SUFFIXES, detect_format, read_head, sniff
from converge.control.library.inspection.gguf_facts import inspect_gguf
from converge.control.library.inspection.mlflow_facts import inspect_mlflow
from converge.control.library.inspection.onnx_facts import inspect_onnx
from converge.control.library.inspection.results import Inspection


def inspect_artifact(path: str | Path) -> Inspection:
    """Read what a model file or folder says about itself, without loading its weights.

    Raises FileNotFoundError for a missing path and InspectionError when a file has the marks
    of a format but cannot be read as one.
    """
    target = Path(path)
    fmt = detect_format(target)
    if target.is_dir():
        return _inspect_folder(target, fmt)
    return _inspect_file(target, fmt)


def _inspect_file(path: Path, fmt: str) -> Inspection:
    if fmt == "gguf":
        return inspect_gguf(path)
    if fmt == "onnx":
        return inspect_onnx(path)
    if fmt == "safetensors":
        return _with_tensor_summary(Inspection(format=fmt, files=[path.name]), [path])
    if fmt == "pickle":
        return _inspect_pickle(path)
    return Inspection(format="unknown", memory_bytes=path.stat().st_size, files=[path.name])


def _inspect_pickle(path: Path) -> Inspection:
    # Reading anything more out of a pickle means executing it; that waits for a clean scan.
    kind = sniff(path)
    extra: dict[str, object] = {"container": kind}
    memory_bytes: int | None = path.stat().st_size
    if kind == "compressed":
        extra["compression"] = decompress.compression_codec(read_head(path))
        extra["file_bytes"] = memory_bytes
        memory_bytes = None  # the inflated size is unknown until the scanner inflates it
    return Inspection(format="pickle", memory_bytes=memory_bytes, files=[path.name], extra=extra)


def _relative_files(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def _inspect_folder(folder: Path, fmt: str) -> Inspection:
    if fmt == "mlflow":
        return inspect_mlflow(folder, inspect=inspect_artifact, detect=detect_format)
    if fmt in ("gguf", "onnx"):
        candidates = [path for path in folder.glob(f"*.{fmt}") if detect_format(path) == fmt]
        # Repos sometimes ship several quantisations; the largest is the reference one.
        chosen = max(candidates, key=lambda path: path.stat().st_size)
        result = _inspect_file(chosen, fmt)
        result.extra["model_file"] = chosen.name
        result.files = _relative_files(folder)
        return result
    if fmt in ("safetensors", "sentence-transformers", "hf"):
        return _inspect_hf_folder(folder, fmt)
    return Inspection(format="unknown", files=_relative_files(folder))


def _transformer_folder(folder: Path) -> Path:
    """Where config.json lives: the root, or an old sentence-transformers "0_Transformer/" module."""
    if (folder / "config.json").is_file():
        return folder
    for module in hf_facts.read_json(folder / "modules.json") or []:
        if str(module.get("type", "")).endswith("Transformer") and module.get("path"):
            candidate = folder / str(module["path"])
            if candidate.resolve().is_relative_to(folder.resolve()) and (candidate / "config.json").is_file():
                return candidate
    return folder


def _inspect_hf_folder(folder: Path, fmt: str) -> Inspection:
    model_folder = _transformer_folder(folder)
    config = hf_facts.read_json(model_folder / "config.json")
    facts = hf_facts.config_facts(config) if isinstance(config, dict) else {"extra": {}}
    license_id, license_extra = hf_facts.license_facts(folder)
    result = Inspection(
        format=fmt,
        architecture=facts.get("architecture"),
        context_length=facts.get("context_length"),
        kv_cache_bytes_per_1k_tokens=facts.get("kv_cache_bytes_per_1k_tokens"),
        chat_template=hf_facts.chat_template(model_folder),
        license=license_id,
        files=_relative_files(folder),
        extra={**facts["extra"], **license_extra},
    )
    if fmt == "sentence-transformers":
        result.extra.update(hf_facts.sentence_transformers_facts(folder))
    weights = safetensors_facts.weight_files(folder)
    if weights:
        result.extra["weights_format"] = "safetensors"
        return _with_tensor_summary(result, weights)
    pickled = [path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in TORCH_SUFFIXES]
    if pickled:
        result.extra["weights_format"] = "pytorch"
        result.extra["note"] = "weights are pickled: counting parameters would mean unpickling them"
        # torch archives store tensor storages uncompressed, so file size tracks weight bytes.
        result.memory_bytes = sum(path.stat().st_size for path in pickled)
    return result


def _with_tensor_summary(result: Inspection, weights: list[Path]) -> Inspection:
    summary = safetensors_facts.summarise(weights)
    result.parameter_count = summary.parameter_count
    result.dtypes = sorted(summary.dtypes)
    result.memory_bytes = summary.memory_bytes
    if summary.metadata:
        result.extra["safetensors_metadata"] = summary.metadata
    return result

"""Facts from an ONNX graph: opset, typed inputs/outputs and initializer sizes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import onnx

from converge.control.library.inspection.results import Inspection, InspectionError

_DEFAULT_DOMAINS = ("", "ai.onnx")


def inspect_onnx(path: Path) -> Inspection:
    try:
        # External tensor files are left on disk; initializer dims are in the graph itself.
        # Embedded weights do get read, but protobuf caps a model file at 2 GB, which bounds it.
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError, ... for foreign bytes
        raise InspectionError(f"{path.name} is not a readable ONNX model: {exc}") from exc
    graph = model.graph
    initializers = list(graph.initializer)
    initializer_names = {tensor.name for tensor in initializers}
    opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    external = _external_files(path, initializers)
    extra: dict[str, Any] = {
        "ir_version": model.ir_version,
        "producer": " ".join(filter(None, (model.producer_name, model.producer_version))) or None,
        "graph_name": graph.name or None,
        "opset_imports": opsets,
        "metadata": {prop.key: prop.value for prop in model.metadata_props},
    }
    if external:
        extra["external_data"] = [file.name for file in external]
    return Inspection(
        format="onnx",
        parameter_count=sum(math.prod(tensor.dims) for tensor in initializers),
        dtypes=sorted({onnx.TensorProto.DataType.Name(tensor.data_type) for tensor in initializers}) or None,
        opset=next((opsets[domain] for domain in _DEFAULT_DOMAINS if domain in opsets), None),
        # Older exporters list initializers among graph inputs; callers never feed those.
        inputs=[_value_info(value) for value in graph.input if value.name not in initializer_names],
        outputs=[_value_info(value) for value in graph.output],
        memory_bytes=path.stat().st_size + sum(file.stat().st_size for file in external),
        files=[path.name],
        extra=extra,
    )


def _external_files(path: Path, initializers: list[onnx.TensorProto]) -> list[Path]:
    folder = path.parent.resolve()
    locations = {
        entry.value
        for tensor in initializers
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    files = [(folder / location).resolve() for location in sorted(locations)]
    # A location is untrusted text; never follow one out of the model's folder.
    return [file for file in files if file.is_relative_to(folder) and file.is_file()]


def _value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        # sklearn-onnx classifiers output e.g. seq(map(int64, float)); name the container kind.
        return {"name": value.name, "dtype": kind, "shape": None}
    tensor = value.type.tensor_type
    shape = None
    if tensor.HasField("shape"):
        shape = [_dimension(dim) for dim in tensor.shape.dim]
    return {"name": value.name, "dtype": onnx.TensorProto.DataType.Name(tensor.elem_type), "shape": shape}


def _dimension(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return dim.dim_value
    return dim.dim_param or None  # symbolic ("batch") or unknown

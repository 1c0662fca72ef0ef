"""Code paths in model formats that are not pickles: Keras configs, ONNX external data, safetensors headers.

- Keras: a `Lambda` layer carries marshalled Python bytecode that Keras runs when it rebuilds
  the model, and a layer whose `module` is outside `keras` makes Keras import that module.
  Both are dangerous, in a `.keras` zip's config.json and in a legacy HDF5 file's
  `model_config` alike.
- ONNX: a tensor's external data `location` is a path the runtime opens next to the model; an
  absolute path, a `..` or a symlink out of the artifact reads files that are not the model.
- safetensors: every tensor's `data_offsets` must lie inside the data section, in order,
  without overlap, and span exactly dtype x shape bytes; readers that trust the header would
  otherwise read out of bounds (dangerous) or misread the weights (error).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Any

import onnx

from converge.control.library.inspection.results import Finding, Severity
from converge.control.library.inspection.safetensors_facts import header_problems

_LAMBDA_CLASSES = frozenset({"Lambda", "TFOpLambda", "SlicingOpLambda", "__lambda__"})
# h5py is not a dependency: a legacy Keras HDF5 file stores `model_config` as a plain string
# attribute near the root group's header, so a bounded byte search finds the JSON without an
# HDF5 parser. A config stored beyond this many bytes goes unseen (noted in the report).
HDF5_SEARCH_BYTES = 64 * 1024**2
_HDF5_CHUNK = 1 << 20
_H5_CLASS = re.compile(rb'"class_name"\s*:\s*"([^"\\]{1,200})"')
_H5_MODULE = re.compile(rb'"module"\s*:\s*"([^"\\]{0,200})"')
_H5_REGISTERED = re.compile(rb'"registered_name"\s*:\s*"([^"\\]{0,200})"')
MAX_CONFIG_BYTES = 64 * 1024**2


def _finding(label: str, severity: Severity, message: str) -> Finding:
    return Finding(file=label, global_name=None, severity=severity, message=message)


# -- Keras ------------------------------------------------------------------------------------


def keras_config_findings(stream: IO[bytes], *, label: str) -> list[Finding] | None:
    """Findings for a Keras `config.json`; None when the JSON is not a Keras model config."""
    try:
        config = json.loads(stream.read(MAX_CONFIG_BYTES))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(config, dict) and "class_name" in config and "config" in config):
        return None  # e.g. a transformers config.json
    problems = dict.fromkeys(_keras_problems(config))
    return [_finding(label, "dangerous", problem) for problem in problems]


def _keras_problems(node: Any) -> Iterator[str]:
    if isinstance(node, list):
        for item in node:
            yield from _keras_problems(item)
        return
    if not isinstance(node, dict):
        return
    class_name, module = node.get("class_name"), node.get("module")
    if isinstance(class_name, str):
        yield from _keras_object(class_name, module, node.get("registered_name"))
    for value in node.values():
        yield from _keras_problems(value)


def _keras_object(class_name: str, module: Any, registered: Any) -> Iterator[str]:
    if class_name in _LAMBDA_CLASSES:
        yield f"Keras {class_name} layer: its Python bytecode runs when the model is loaded"
    if isinstance(module, str) and module and module != "keras" and not module.startswith("keras."):
        yield f"Keras object {class_name} comes from module {module!r}, outside keras: loading imports it"
    if isinstance(registered, str) and ">" in registered:
        yield f"Keras object {registered!r} is a custom registered object: loading runs its code"


def hdf5_findings(stream: IO[bytes], *, label: str) -> list[Finding]:
    """A bounded byte search of a legacy Keras HDF5 file for its model config's classes and modules."""
    problems: dict[str, None] = {}
    tail = b""
    read = 0
    while read < HDF5_SEARCH_BYTES and (chunk := stream.read(_HDF5_CHUNK)):
        read += len(chunk)
        window = tail + chunk
        for match in _H5_CLASS.finditer(window):
            problems.update(dict.fromkeys(_keras_object(_text(match), None, None)))
        for match in _H5_MODULE.finditer(window):
            problems.update(dict.fromkeys(_keras_object("(layer)", _text(match), None)))
        for match in _H5_REGISTERED.finditer(window):
            problems.update(dict.fromkeys(_keras_object("(layer)", None, _text(match))))
        tail = window[-512:]  # a match cut by the chunk boundary is found in the next window
    return [_finding(label, "dangerous", problem) for problem in problems]


def _text(match: re.Match[bytes]) -> str:
    return match.group(1).decode("utf-8", errors="replace")


# -- ONNX -------------------------------------------------------------------------------------


def onnx_findings(stream: IO[bytes], *, label: str, path: Path | None, root: Path) -> list[Finding] | None:
    """External-data locations that leave the artifact; None when the bytes are not ONNX."""
    try:
        model = onnx.load_model(stream, load_external_data=False)
    except Exception:  # not ONNX after all (the sniff is a heuristic): the runtime cannot load it either
        return None
    found = []
    for location in sorted(set(_external_locations(model))):
        problem = _location_problem(location, path=path, root=root)
        if problem is not None:
            message = f"ONNX external data location {location!r} {problem}"
            found.append(_finding(label, "dangerous", message))
    return found


def _external_locations(model: onnx.ModelProto) -> Iterator[str]:
    for tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    yield entry.value


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        for sparse in [attribute.sparse_tensor, *attribute.sparse_tensors]:
            yield from (sparse.values, sparse.indices)
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _graph_tensors(graph)


def _location_problem(location: str, *, path: Path | None, root: Path) -> str | None:
    posix, windows = PurePosixPath(location), PureWindowsPath(location)
    if not location or posix.is_absolute() or windows.is_absolute() or windows.drive:
        return "is absolute: it reads a file outside the model"
    if ".." in posix.parts or ".." in windows.parts:
        return "contains '..': it reads a file outside the model"
    if path is not None:
        target = (path.parent / location).resolve()
        if not target.is_relative_to(root.resolve()):
            return "resolves (through a symlink) outside the artifact"
    return None


# -- safetensors ------------------------------------------------------------------------------


def safetensors_findings(stream: IO[bytes], *, label: str) -> list[Finding]:
    return [_finding(label, severity, message) for severity, message in header_problems(stream)]

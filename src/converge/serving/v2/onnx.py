"""ONNX models behind the Open Inference Protocol (V2), on onnxruntime in this process.

MLServer has no maintained ONNX runtime (there is no mlserver-onnx on PyPI), and onnxruntime
installs fine in Converge's own environment, so this is a small V2 server of our own: model
metadata, readiness and `infer`, with requests checked against the graph's inputs (names,
datatypes, ranks and fixed dimensions) before onnxruntime sees them. Inference runs in a worker
thread, one request at a time (onnxruntime already spreads one run over every core); requests
beyond it wait, and `/converge/stats` reports them as queued.
"""

from __future__ import annotations

import argparse
import asyncio
import math
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from converge.serving.common import ModelHost
from converge.serving.v2.protocol import (
    KIND,
    V2Error,
    check_inputs,
    error_response,
    infer_path,
    parse_infer_request,
)

# onnxruntime's element types (NodeArg.type) as V2 datatypes and numpy dtypes.
ORT_TYPES: dict[str, tuple[str, Any]] = {
    "tensor(float)": ("FP32", np.float32),
    "tensor(double)": ("FP64", np.float64),
    "tensor(float16)": ("FP16", np.float16),
    "tensor(int8)": ("INT8", np.int8),
    "tensor(int16)": ("INT16", np.int16),
    "tensor(int32)": ("INT32", np.int32),
    "tensor(int64)": ("INT64", np.int64),
    "tensor(uint8)": ("UINT8", np.uint8),
    "tensor(uint16)": ("UINT16", np.uint16),
    "tensor(uint32)": ("UINT32", np.uint32),
    "tensor(uint64)": ("UINT64", np.uint64),
    "tensor(bool)": ("BOOL", np.bool_),
    "tensor(string)": ("BYTES", np.object_),
}


def onnx_file(path: Path) -> Path:
    if path.is_dir():
        found = sorted(path.glob("*.onnx"))
        if len(found) != 1:
            raise ValueError(f"{path} must hold exactly one .onnx file, found {len(found)}")
        return found[0]
    return path


def external_data_escapes(path: Path) -> list[str]:
    """External-data locations that leave the model's folder (absolute, `..`, symlinks out).

    The registration scan refuses such models; this is the replica's own check before
    onnxruntime opens whatever file a location names.
    """
    import onnx
    from onnx import external_data_helper

    model = onnx.load(str(path), load_external_data=False)
    folder = path.parent.resolve()
    escapes = set()
    for tensor in external_data_helper._get_all_tensors(model):  # every initializer and attribute tensor
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key == "location":
                target = (folder / entry.value).resolve()
                if Path(entry.value).is_absolute() or not target.is_relative_to(folder):
                    escapes.add(entry.value)
    return sorted(escapes)


def _dims(shape: Any) -> list[int]:
    """onnxruntime dims (ints, symbolic names, None) as V2 metadata dims (-1 = any)."""
    return [dim if isinstance(dim, int) and dim >= 0 else -1 for dim in shape or []]


def tensor_metadata(node: Any) -> dict[str, Any] | None:
    """V2 metadata for one graph input or output; None for non-tensors (sequences, maps)."""
    if node.type not in ORT_TYPES:
        return None
    return {"name": node.name, "datatype": ORT_TYPES[node.type][0], "shape": _dims(node.shape)}


def to_array(tensor: dict[str, Any], numpy_dtype: Any) -> np.ndarray:
    name = tensor["name"]
    try:
        array = np.asarray(tensor["data"], dtype=numpy_dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise V2Error(f"input '{name}': 'data' does not hold {tensor['datatype']} values ({exc})") from None
    if array.size != math.prod(tensor["shape"]):  # ragged nested lists
        raise V2Error(f"input '{name}': 'data' does not fill shape {tensor['shape']}")
    return array.reshape(tensor["shape"])


def from_array(name: str, value: Any) -> dict[str, Any]:
    array = np.asarray(value)
    if array.dtype.kind in "OSU":
        data = [
            item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
            for item in array.ravel()
        ]
        datatype = "BYTES"
    else:
        datatype = next(
            v2 for v2, dtype in ORT_TYPES.values() if dtype is not np.object_ and array.dtype == dtype
        )
        data = array.ravel().tolist()
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


class OnnxModel:
    """One inference session with its V2 metadata."""

    def __init__(self, path: Path, *, name: str) -> None:
        import onnxruntime as ort
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

        self.ort = ort
        self.invalid_argument = InvalidArgument
        self.name = name
        self.path = onnx_file(path)
        escapes = external_data_escapes(self.path)
        if escapes:
            raise ValueError(
                f"{self.path.name} reads external data from outside its folder: {', '.join(escapes)}"
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initializers are noise here
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.inputs = [meta for node in self.session.get_inputs() if (meta := tensor_metadata(node))]
        if len(self.inputs) != len(self.session.get_inputs()):
            raise ValueError(f"{self.path.name} has non-tensor inputs, which V2 cannot carry")
        self.dtypes = {node.name: ORT_TYPES[node.type][1] for node in self.session.get_inputs()}
        self.outputs = [meta for node in self.session.get_outputs() if (meta := tensor_metadata(node))]
        self.all_outputs = [node.name for node in self.session.get_outputs()]

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [],
            "platform": "onnxruntime_onnx",
            "inputs": self.inputs,
            "outputs": self.outputs,
        }

    def prepare(self, request: dict[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
        """Feeds and output names for one checked request; V2Error (400) when it does not fit."""
        pairs = check_inputs(request["inputs"], self.inputs, by_name=True, exact_datatype=True)
        feeds = {spec["name"]: to_array(tensor, self.dtypes[spec["name"]]) for tensor, spec in pairs}
        tensor_outputs = [meta["name"] for meta in self.outputs]
        wanted = [item["name"] for item in request.get("outputs") or []]
        for name in wanted:
            if name not in self.all_outputs:
                raise V2Error(f"unknown output '{name}'; the model has {', '.join(tensor_outputs)}")
            if name not in tensor_outputs:
                raise V2Error(f"output '{name}' is not a tensor (a sequence or map), which V2 cannot carry")
        return feeds, wanted or tensor_outputs

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[dict[str, Any]]:
        try:
            values = self.session.run(outputs, feeds)
        except self.invalid_argument as exc:
            # e.g. a dimension the graph fixes deeper inside than its declared input shape
            raise V2Error(f"the model rejected the input: {exc}") from None
        return [from_array(name, value) for name, value in zip(outputs, values, strict=True)]


def create_app(model: OnnxModel) -> Starlette:
    one_at_a_time = asyncio.Semaphore(1)

    def known(request: Request) -> JSONResponse | None:
        name = request.path_params["name"]
        return None if name == model.name else error_response(404, f"model '{name}' not found")

    async def server_metadata(_request: Request) -> JSONResponse:
        return JSONResponse({"name": "converge-onnx", "version": model.ort.__version__, "extensions": []})

    async def server_health(_request: Request) -> JSONResponse:
        return JSONResponse({})

    async def model_metadata(request: Request) -> JSONResponse:
        return known(request) or JSONResponse(model.metadata())

    async def model_ready(request: Request) -> JSONResponse:
        return known(request) or JSONResponse({"name": model.name, "ready": True})

    async def infer(request: Request) -> JSONResponse:
        if (missing := known(request)) is not None:
            return missing
        try:
            body = parse_infer_request(await request.body())
            feeds, outputs = model.prepare(body)
            async with one_at_a_time:
                result = await run_in_threadpool(model.run, feeds, outputs)
        except V2Error as exc:
            return error_response(exc.status_code, exc.message)
        response = {"model_name": model.name, "outputs": result}
        if isinstance(body.get("id"), str):
            response["id"] = body["id"]
        return JSONResponse(response)

    return Starlette(
        routes=[
            Route("/v2", server_metadata, methods=["GET"]),
            Route("/v2/health/live", server_health, methods=["GET"]),
            Route("/v2/health/ready", server_health, methods=["GET"]),
            Route("/v2/models/{name}", model_metadata, methods=["GET"]),
            Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
            Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        ]
    )


def load_app(*, model_path: str, model_name: str) -> ASGIApp:
    """Open the graph and build the V2 API around it (blocking)."""
    return create_app(OnnxModel(Path(model_path), name=model_name))


def build_host(args: argparse.Namespace) -> ModelHost:
    return ModelHost(
        kind=KIND,
        model_name=args.model_name,
        load=lambda: load_app(model_path=args.model_path, model_name=args.model_name),
        inference_paths={infer_path(args.model_name)},
        max_concurrency=1,
    )

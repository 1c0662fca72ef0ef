"""The V2 protocol both backends share: the kind, the paths, the error envelope and request checks.

Requests to `infer` are checked against the V2 tensor rules (and the model's declared inputs)
before a backend sees them, so a malformed request is a 400 with a message, not MLServer's
bare "Internal Server Error" or an onnxruntime traceback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from starlette.responses import JSONResponse

KIND = "v2"

# V2 tensor datatypes and what their elements must be.
NUMERIC_DATATYPES = frozenset(
    {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"}
)
DATATYPES = NUMERIC_DATATYPES | {"BOOL", "BYTES"}


class V2Error(Exception):
    """A request the model cannot take; rendered as V2's `{"error": message}`."""

    def __init__(self, message: str, *, status_code: int = 400) -> None:
        super().__init__(message)
        self.message, self.status_code = message, status_code


def error_response(status_code: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code)


def infer_path(model_name: str) -> str:
    return f"/v2/models/{model_name}/infer"


def _count(data: Any) -> int:
    """Elements in a V2 `data` value, flat or nested (row-major) lists."""
    if isinstance(data, list):
        return sum(_count(item) for item in data)
    return 1


def _elements_fit(data: Any, datatype: str) -> bool:
    """Whether every element suits the datatype (JSON numbers, booleans or strings)."""
    if isinstance(data, list):
        return all(_elements_fit(item, datatype) for item in data)
    if datatype == "BYTES":
        return isinstance(data, str)
    if datatype == "BOOL":
        return isinstance(data, bool)
    if isinstance(data, bool) or not isinstance(data, int | float):
        return False
    return datatype.startswith("FP") or float(data).is_integer()


def parse_infer_request(body: bytes) -> dict[str, Any]:
    """The request as JSON, checked against the V2 tensor rules; V2Error (400) when it breaks one."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise V2Error("the request body is not valid JSON") from None
    if not isinstance(request, dict):
        raise V2Error("the request body must be a JSON object with an 'inputs' list")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise V2Error("'inputs' must be a non-empty list of tensors")
    seen: set[str] = set()
    for position, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise V2Error(f"inputs[{position}] must be an object with name, shape, datatype and data")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise V2Error(f"inputs[{position}]: 'name' must be a non-empty string")
        if name in seen:
            raise V2Error(f"input '{name}' is given more than once")
        seen.add(name)
        shape = tensor.get("shape")
        if not isinstance(shape, list) or any(
            isinstance(dim, bool) or not isinstance(dim, int) or dim < 0 for dim in shape
        ):
            raise V2Error(f"input '{name}': 'shape' must be a list of non-negative integers")
        datatype = tensor.get("datatype")
        if datatype not in DATATYPES:
            raise V2Error(f"input '{name}': 'datatype' must be one of {', '.join(sorted(DATATYPES))}")
        if "data" not in tensor:
            raise V2Error(f"input '{name}': 'data' is missing")
        data = tensor["data"]
        expected, given = math.prod(shape), _count(data)
        if given != expected:
            raise V2Error(f"input '{name}': shape {shape} needs {expected} elements, 'data' holds {given}")
        if not _elements_fit(data, datatype):
            raise V2Error(f"input '{name}': 'data' holds values that are not {datatype}")
    outputs = request.get("outputs")
    if outputs is not None and (
        not isinstance(outputs, list)
        or any(not isinstance(item, dict) or not isinstance(item.get("name"), str) for item in outputs)
    ):
        raise V2Error("'outputs' must be a list of objects with a 'name'")
    return request


def _shape_fits(shape: Sequence[int], declared: Sequence[Any]) -> bool:
    if len(declared) == 1 and len(shape) == 2 and shape[1] == 1:
        shape = shape[:1]  # a column sent as [N, 1] (MLflow column signatures declare [-1])
    if len(shape) != len(declared):
        return False
    return all(
        not isinstance(want, int) or want < 0 or want == got
        for got, want in zip(shape, declared, strict=True)
    )


def _describe(spec: dict[str, Any]) -> str:
    shape = ["?" if not isinstance(d, int) or d < 0 else d for d in spec.get("shape") or []]
    return f"'{spec['name']}' {spec['datatype']} [{', '.join(map(str, shape))}]"


def check_inputs(
    inputs: list[dict[str, Any]], declared: list[dict[str, Any]], *, by_name: bool, exact_datatype: bool
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pair each given tensor with the declared input it feeds; V2Error (400) on any mismatch.

    `by_name`: the model's input names must be used (ONNX); otherwise tensors are taken in
    order, as MLServer's scikit-learn runtime does. `exact_datatype`: the datatype must be the
    declared one; otherwise any numeric datatype may feed a numeric input (sklearn converts).
    """
    expected = ", ".join(_describe(spec) for spec in declared)
    if by_name:
        wanted = {spec["name"]: spec for spec in declared}
        unknown = [tensor["name"] for tensor in inputs if tensor["name"] not in wanted]
        if unknown:
            raise V2Error(f"unknown input '{unknown[0]}'; the model takes {expected}")
        given = {tensor["name"]: tensor for tensor in inputs}
        missing = [name for name in wanted if name not in given]
        if missing:
            raise V2Error(f"input '{missing[0]}' is missing; the model takes {expected}")
        pairs = [(given[name], spec) for name, spec in wanted.items()]
    else:
        if len(inputs) != len(declared):
            raise V2Error(f"the model takes {len(declared)} input tensor(s) ({expected}), got {len(inputs)}")
        pairs = list(zip(inputs, declared, strict=True))
    for tensor, spec in pairs:
        name, want = tensor["name"], spec["datatype"]
        if exact_datatype:
            fits = tensor["datatype"] == want
        else:
            fits = tensor["datatype"] == want or (
                want in NUMERIC_DATATYPES and tensor["datatype"] in NUMERIC_DATATYPES | {"BOOL"}
            )
        if not fits:
            raise V2Error(f"input '{name}' is {tensor['datatype']}; the model expects {want}")
        if spec.get("shape") is not None and not _shape_fits(tensor["shape"], spec["shape"]):
            raise V2Error(f"input '{name}' has shape {tensor['shape']}; the model takes {_describe(spec)}")
    return pairs

"""Tensor facts from safetensors headers: 8-byte little-endian length, then a JSON table.

Only the header is read, so a 100 GB sharded checkpoint is summarised in milliseconds.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from converge.control.library.inspection.detect import MAX_SAFETENSORS_HEADER
from converge.control.library.inspection.results import InspectionError

INDEX_FILE = "model.safetensors.index.json"
# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64,
    "F64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


@dataclass
class TensorSummary:
    parameter_count: int = 0
    memory_bytes: int = 0
    dtypes: set[str] = field(default_factory=set)
    metadata: dict[str, str] = field(default_factory=dict)

    def add(self, header: dict[str, Any]) -> None:
        for name, entry in header.items():
            if name == "__metadata__":
                self.metadata.update(entry or {})
                continue
            # Every tensor counts, integer ones too: quantised checkpoints store weights packed
            # in int32/uint8. The price is that int buffers such as BERT's position_ids count.
            self.parameter_count += math.prod(entry["shape"])
            begin, end = entry["data_offsets"]
            self.memory_bytes += end - begin  # exact, even for sub-byte dtypes such as F4
            self.dtypes.add(entry["dtype"])


def read_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise InspectionError(f"{path.name} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_SAFETENSORS_HEADER:
            raise InspectionError(f"{path.name} declares a {length}-byte header; refusing to read it")
        raw = stream.read(length)
    if len(raw) != length:
        raise InspectionError(f"{path.name} is truncated inside its header")
    try:
        header = json.loads(raw)
        _validate(header)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError, KeyError) as exc:
        raise InspectionError(f"{path.name} has a malformed safetensors header: {exc}") from exc
    return header


def _validate(header: Any) -> None:
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not all(isinstance(dim, int) and dim >= 0 for dim in shape) or len(offsets) != 2:
            raise ValueError(f"tensor {name!r} has an invalid shape or offsets")
        if not isinstance(entry["dtype"], str):
            raise ValueError(f"tensor {name!r} has no dtype")


def weight_files(folder: Path) -> list[Path]:
    """The shards that make up the model; the index wins so a stray consolidated copy isn't counted twice."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InspectionError(f"{INDEX_FILE} is malformed: {exc}") from exc
        listed = sorted({folder / name for name in weight_map.values()})
        root = folder.resolve()
        if not all(path.resolve().is_relative_to(root) for path in listed):
            raise InspectionError(f"{INDEX_FILE} points outside the model folder")
        missing = [path.name for path in listed if not path.is_file()]
        if missing:
            raise InspectionError(f"{INDEX_FILE} lists shards that are missing: {', '.join(missing)}")
        return listed
    return sorted(folder.rglob("*.safetensors"))


def summarise(paths: list[Path]) -> TensorSummary:
    summary = TensorSummary()
    for path in paths:
        summary.add(read_header(path))
    return summary


Problem = tuple[Literal["dangerous", "error"], str]


def header_problems(stream: IO[bytes]) -> list[Problem]:
    """Bounds-check a safetensors header against the file it heads, as the reference loader does.

    Offsets outside the data section, reversed or overlapping are "dangerous" (a reader that
    trusts them reads out of bounds or aliases tensors); gaps, a size that disagrees with
    dtype x shape, unknown dtypes and an unparsable header are "error".
    """
    size = stream.seek(0, 2)
    stream.seek(0)
    prefix = stream.read(8)
    if len(prefix) < 8:
        return [("error", "too short to be a safetensors file")]
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_SAFETENSORS_HEADER or 8 + length > size:
        return [("dangerous", f"the header length {length} points past the end of the file")]
    try:
        header = json.loads(stream.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [("error", f"the header is not valid JSON: {exc}")]
    if not isinstance(header, dict):
        return [("error", "the header is not a JSON object")]
    data_size = size - 8 - length
    spans: list[tuple[int, int, str]] = []
    problems: list[Problem] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                problems.append(("error", "__metadata__ must map strings to strings"))
            continue
        problem = _tensor_problem(name, entry, data_size=data_size)
        if problem is not None:
            problems.append(problem)
        else:
            begin, end = entry["data_offsets"]
            spans.append((begin, end, name))
    return problems + _layout_problems(spans, data_size=data_size)


def _tensor_problem(name: str, entry: Any, *, data_size: int) -> Problem | None:
    if not isinstance(entry, dict):
        return ("error", f"tensor {name!r} is not described by an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        return ("error", f"tensor {name!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        return ("error", f"tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        return ("error", f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        return ("dangerous", f"tensor {name!r} data_offsets {offsets} fall outside the {data_size}-byte data")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        return (
            "error",
            f"tensor {name!r} spans {end - begin} bytes, but {dtype} x {shape} needs {bits / 8:g}",
        )
    return None


def _layout_problems(spans: list[tuple[int, int, str]], *, data_size: int) -> list[Problem]:
    problems: list[Problem] = []
    position = 0
    for begin, end, name in sorted(spans):
        if begin < position:
            problems.append(("dangerous", f"tensor {name!r} overlaps the tensor before it"))
        elif begin > position:
            problems.append(("error", f"tensor {name!r} leaves a gap of {begin - position} bytes before it"))
        position = max(position, end)
    if position != data_size and not problems:
        problems.append(("error", f"the tensors cover {position} of {data_size} data bytes"))
    return problems

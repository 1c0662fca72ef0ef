"""Tensor facts from safetensors headers: 8-byte little-endian length, then a JSON table.

Only the header is read, so a 100 GB sharded checkpoint is summarised in milliseconds.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converge.control.library.inspection.detect import MAX_SAFETENSORS_HEADER
from converge.control.library.inspection.results import InspectionError

INDEX_FILE = "model.safetensors.index.json"


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

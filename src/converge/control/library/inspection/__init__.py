"""Facts read from model files themselves, and pickle scanning.

Nothing here loads weights, unpickles, or touches the network: headers and metadata are read
(GGUF via a memory map, safetensors headers, ONNX graphs, JSON/YAML side files) and pickles are
disassembled, never executed. Builds call these before anything is allowed to load a model.
"""

from converge.control.library.inspection.detect import detect_format
from converge.control.library.inspection.inspector import inspect_artifact
from converge.control.library.inspection.results import (
    Finding,
    Inspection,
    InspectionError,
    ScanResult,
)
from converge.control.library.inspection.scanning import DEFAULT_MAX_DECOMPRESSED_BYTES, scan_artifact

__all__ = [
    "DEFAULT_MAX_DECOMPRESSED_BYTES",
    "Finding",
    "Inspection",
    "InspectionError",
    "ScanResult",
    "detect_format",
    "inspect_artifact",
    "scan_artifact",
]

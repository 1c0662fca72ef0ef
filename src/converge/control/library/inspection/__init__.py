"""Facts read from model files themselves, and the scan of the code paths they carry.

Nothing here loads weights, unpickles, renders a template or touches the network: headers and
metadata are read (GGUF, safetensors headers, ONNX graphs, JSON/YAML side files), pickles are
followed opcode by opcode against an allow-list, never executed, and chat templates are parsed,
never rendered. Builds call these before anything is allowed to load a model.
"""

from converge.control.library.inspection.detect import detect_format
from converge.control.library.inspection.inspector import inspect_artifact
from converge.control.library.inspection.results import (
    Finding,
    Inspection,
    InspectionError,
    ScanResult,
)
from converge.control.library.inspection.scanning import (
    DEFAULT_MAX_DECOMPRESSED_BYTES,
    ScanLimits,
    scan_artifact,
)

__all__ = [
    "DEFAULT_MAX_DECOMPRESSED_BYTES",
    "Finding",
    "Inspection",
    "InspectionError",
    "ScanLimits",
    "ScanResult",
    "detect_format",
    "inspect_artifact",
    "scan_artifact",
]

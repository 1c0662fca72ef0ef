"""Open Inference Protocol (V2): scikit-learn and MLflow models through MLServer, ONNX on onnxruntime.

MLServer runs from its own virtual environment on an internal port, with a thin proxy in front
of it that forwards `/v2/*` and adds Converge's `/health/*` and `/converge/stats`. ONNX has no
maintained MLServer runtime, so ONNX models are served in-process by `onnx`.

    protocol.py    the kind, paths, error envelope and request checks both backends share
    formats.py     the artifact's format, and where MLServer's environment lives
    restricted.py  restricted loaders, copied into MLServer's environment (no converge imports)
    mlserver.py    MLServer as a child process: settings, environment, start/watch/stop
    proxy.py       the ASGI proxy in front of MLServer
    host.py        the replica for scikit-learn and MLflow: MLServer plus the proxy
    onnx.py        the replica for ONNX, on onnxruntime in this process
    entry.py       `add_arguments` and `build_host` for `python -m converge.serving v2`

Each module imports only modules listed above it, never the names this `__init__` re-exports
(`tests/serving/test_v2_package.py` holds them to that).
"""

from converge.serving.v2.entry import add_arguments, build_host
from converge.serving.v2.formats import find_mlserver_venv, model_format
from converge.serving.v2.protocol import KIND, V2Error, check_inputs, parse_infer_request

__all__ = [
    "KIND",
    "V2Error",
    "add_arguments",
    "build_host",
    "check_inputs",
    "find_mlserver_venv",
    "model_format",
    "parse_infer_request",
]

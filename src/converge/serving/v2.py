"""Open Inference Protocol (V2): scikit-learn and MLflow models through MLServer, ONNX on onnxruntime.

MLServer cannot share Converge's environment (its fastapi and protobuf pins clash with ours),
so it runs from its own virtual environment (`make mlserver-venv`), like a KServe runtime runs
from its own image. This replica starts it on an internal port and serves a thin proxy in
front of it: `/v2/*` is forwarded, and Converge's `/health/*` and `/converge/stats` are added.
ONNX has no maintained MLServer runtime, so ONNX models are served in-process by `v2_onnx`.

The proxy forwards with aiohttp's client: it sits on the data path of every inference, and
measured here a bare proxy on httpx collapsed at 64 concurrent requests where aiohttp's held.
Requests to `infer` are checked against the V2 tensor rules (and the model's declared inputs)
before they are forwarded, so a malformed request is a 400 with a message, not MLServer's
bare "Internal Server Error".

Models load through restricted unpicklers (`v2_restricted`, run inside MLServer's environment
with a copy of `core/pickle_allowlist.py`): the probe and MLServer's runtimes only import the
globals the registration scan allows, as a second line behind that scan.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from converge.serving import v2_restricted
from converge.serving.common import ModelHost, positive_int

log = logging.getLogger("converge.serving.v2")

KIND = "v2"
MLSERVER_VENV_ENV = "CONVERGE_MLSERVER_VENV"
MLSERVER_VENV_DIR = ".venv-mlserver"
FORMATS = ("auto", "pickle", "mlflow", "onnx")
# mlserver_sklearn.SKLearnModel and mlserver_mlflow.MLflowRuntime, loading through the allow-list.
IMPLEMENTATIONS = {
    "pickle": v2_restricted.SKLEARN_RUNTIME,
    "mlflow": v2_restricted.MLFLOW_RUNTIME,
}
# Inside the folder MLServer starts from: the restricted runtimes and the allow-list.
SUPPORT_DIR = "converge-runtime"
STOP_TIMEOUT_S = 10

# V2 tensor datatypes and what their elements must be.
NUMERIC_DATATYPES = frozenset(
    {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"}
)
DATATYPES = NUMERIC_DATATYPES | {"BOOL", "BYTES"}
# Headers that describe one hop, not the message (RFC 9110 section 7.6.1), plus those the client recomputes.
HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


# ---------------------------------------------------------------------------------------------
# The V2 request: structure and declared inputs, checked the same way for every backend


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


# ---------------------------------------------------------------------------------------------
# Finding the model's format and MLServer's environment


def model_format(path: Path, requested: str = "auto") -> str:
    """pickle (scikit-learn joblib/pickle), mlflow (a folder with MLmodel) or onnx."""
    if requested != "auto":
        return requested
    if path.is_dir():
        if (path / "MLmodel").is_file():
            return "mlflow"
        if len(list(path.glob("*.onnx"))) == 1:
            return "onnx"
        raise ValueError(f"{path} is neither an MLflow model folder (no MLmodel) nor holds one .onnx file")
    with path.open("rb") as stream:
        head = stream.read(2)
    if path.suffix.lower() == ".onnx" or (len(head) == 2 and head[0] == 0x08 and head[1] < 0x80):
        return "onnx"  # an ONNX ModelProto opens with ir_version (field 1, varint)
    return "pickle"


def find_mlserver_venv(explicit: str | None = None) -> Path:
    """MLServer's virtual environment: the argument, $CONVERGE_MLSERVER_VENV, or the usual places.

    Without either, `.venv-mlserver` next to the running environment (`make install` puts
    both in the repository root) and then in the source checkout this module comes from.
    """
    chosen = explicit or os.environ.get(MLSERVER_VENV_ENV)
    if chosen:
        candidates = [Path(chosen)]
    else:
        candidates = [Path(sys.prefix).parent / MLSERVER_VENV_DIR]
        checkout = Path(__file__).resolve().parents[3]
        if (checkout / "pyproject.toml").is_file():
            candidates.append(checkout / MLSERVER_VENV_DIR)
    for venv in dict.fromkeys(candidates):
        if (venv / "bin" / "mlserver").is_file() and os.access(venv / "bin" / "mlserver", os.X_OK):
            return venv
    looked = ", ".join(str(venv) for venv in dict.fromkeys(candidates))
    raise FileNotFoundError(
        f"MLServer's environment was not found (looked for bin/mlserver in: {looked}). "
        f"Create it with `make mlserver-venv`, or point {MLSERVER_VENV_ENV} (or --mlserver-venv) at one."
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def probe_sklearn(
    python: Path, model_path: Path, *, env: dict[str, str], timeout: float, support: Path
) -> dict[str, Any]:
    """Load the model once in MLServer's environment and read what its inputs look like.

    It loads the way the runtime will (`v2_restricted`, from `support`), so a model that
    cannot load, or imports a global outside the allow-list, fails here with the loader's own
    error, before MLServer starts.
    """
    proc = subprocess.run(
        [str(python), "-I", "-c", v2_restricted.PROBE, str(model_path), str(support)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"scikit-learn could not load {model_path.name}: {tail[0]}")
    facts: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if not facts["predict"]:
        raise RuntimeError(f"{model_path.name} holds a {facts['type']}, which has no predict()")
    return facts


def declared_sklearn_inputs(facts: dict[str, Any]) -> list[dict[str, Any]]:
    """One FP64 [-1, n_features] tensor for models fitted on arrays; none when that is unknown.

    Models fitted on DataFrames (feature_names_in_) may take strings per column: leave them
    undeclared rather than declare them wrong.
    """
    if facts.get("n_features") is None or facts.get("feature_names"):
        return []
    return [{"name": "input-0", "datatype": "FP64", "shape": [-1, facts["n_features"]]}]


def write_mlserver_config(
    folder: Path,
    *,
    model_name: str,
    model_path: Path,
    implementation: str,
    http_port: int,
    grpc_port: int,
    inputs: list[dict[str, Any]] | None = None,
) -> Path:
    """settings.json plus one model folder with model-settings.json; returns the folder to start."""
    settings = {
        "debug": False,
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,  # MLServer always serves gRPC; keep it internal too
        "metrics_endpoint": None,  # no third port; Converge has /converge/stats
        # In-process inference: with worker processes (and uvloop > 0.21) workers die with
        # "There is no current event loop"; a replica scales by replicas, not workers.
        "parallel_workers": 0,
        "load_models_at_startup": True,
    }
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    model_dir = folder / (re.sub(r"[^A-Za-z0-9._-]", "_", model_name) or "model")
    model_dir.mkdir()
    model_settings: dict[str, Any] = {
        "name": model_name,
        "implementation": implementation,
        "parameters": {"uri": str(model_path)},
    }
    if inputs:
        model_settings["inputs"] = inputs
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    return folder


# ---------------------------------------------------------------------------------------------
# MLServer, a child process


def _death_signal_setter() -> Any:
    """A preexec_fn that makes the child get SIGTERM when its parent thread dies (Linux), or None.

    libc is looked up here, in the parent: the child must not load libraries between fork and exec.
    """
    if sys.platform != "linux":
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def set_death_signal() -> None:  # pragma: no cover - runs in the child between fork and exec
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return set_death_signal


class MLServerProcess:
    """MLServer on an internal port: started, watched and stopped by this replica.

    It runs in its own session so the signals meant for this replica (the supervisor signals
    the replica's process group) do not stop it before the replica has drained; it is stopped
    after the HTTP server (atexit), and Linux stops it if this process dies without cleaning
    up (PR_SET_PDEATHSIG, which fires when the *thread* that forked exits: so the watcher
    thread that starts it lives exactly as long as MLServer does).
    """

    def __init__(self, venv: Path, folder: Path, *, env: dict[str, str], http_port: int) -> None:
        self.venv, self.folder, self.env = venv, folder, env
        self.base_url = f"http://127.0.0.1:{http_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.on_exit: Any = None  # called with the exit code when MLServer stops on its own
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    def start(self) -> None:
        threading.Thread(target=self._run, name="mlserver-watch", daemon=True).start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error
        atexit.register(self.stop)

    def _run(self) -> None:
        try:
            self.proc = subprocess.Popen(
                [str(self.venv / "bin" / "mlserver"), "start", str(self.folder)],
                cwd=self.folder,
                env=self.env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_death_signal_setter(),
            )
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            return
        log.info("MLServer started (pid %d) on %s", self.proc.pid, self.base_url)
        self._started.set()
        code = self.proc.wait()
        if not self.stopping and self.on_exit is not None:
            self.on_exit(code)

    def wait_ready(self, model_name: str, *, timeout: float) -> None:
        """Block until MLServer says the model is ready; raise if it exits or the time runs out."""
        url = f"{self.base_url}/v2/models/{model_name}/ready"
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"MLServer exited with code {code} before the model was ready (see its log above)"
                )
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"MLServer did not report {model_name!r} ready within {timeout:.0f}s")
            time.sleep(0.2)

    def metadata(self, model_name: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base_url}/v2/models/{model_name}", timeout=10) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result

    def stop(self) -> None:
        self.stopping = True
        proc = self.proc
        if proc is not None and proc.poll() is None:
            log.info("stopping MLServer (pid %d)", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def mlserver_env(venv: Path, *, support: Path | None = None) -> dict[str, str]:
    """Our environment minus what would change MLServer's settings or mix the two environments.

    `support`, when given, is the only entry on PYTHONPATH: the restricted runtimes' folder.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLSERVER_", "CONVERGE_"))
        and key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONUNBUFFERED"] = "1"
    if support is not None:
        env["PYTHONPATH"] = str(support)
    return env


# ---------------------------------------------------------------------------------------------
# The proxy in front of MLServer


class MLServerProxy:
    """Forwards `/v2/*` to MLServer; checks `infer` requests first (see `check_inputs`)."""

    def __init__(
        self, upstream: str, *, model_name: str, declared: list[dict[str, Any]], exact_datatype: bool
    ) -> None:
        self.upstream = upstream
        self.infer_path = infer_path(model_name)
        self.declared = declared
        self.exact_datatype = exact_datatype
        self._session: Any = None  # aiohttp.ClientSession, made on the event loop at first use

    def session(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                auto_decompress=False,  # bytes pass through as MLServer encoded them
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def upstream_ready(self, model_name: str) -> tuple[bool, str]:
        import aiohttp

        url = f"{self.upstream}/v2/models/{model_name}/ready"
        try:
            async with self.session().get(url, timeout=aiohttp.ClientTimeout(total=3)) as response:
                return response.status == 200, f"MLServer answered {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return False, f"MLServer is unreachable: {exc or type(exc).__name__}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        path: str = scope["path"]
        if path != "/v2" and not path.startswith("/v2/"):
            await error_response(404, f"no route {path}; this replica serves the V2 API under /v2")(
                scope, receive, send
            )
            return
        request = Request(scope, receive)
        body = await request.body()
        if request.method == "POST" and path == self.infer_path:
            try:
                parsed = parse_infer_request(body)
                if self.declared:
                    check_inputs(
                        parsed["inputs"],
                        self.declared,
                        by_name=len(self.declared) > 1,
                        exact_datatype=self.exact_datatype,
                    )
            except V2Error as exc:
                await error_response(exc.status_code, exc.message)(scope, receive, send)
                return
        await self._forward(scope, receive, send, request, body)

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, request: Request, body: bytes
    ) -> None:
        import aiohttp

        headers = {k: v for k, v in request.headers.items() if k not in HOP_HEADERS}
        content_type = headers.get("content-type", "")
        if body and (not content_type or content_type.startswith("application/x-www-form-urlencoded")):
            # V2 bodies are JSON and MLServer insists on being told so; curl -d says otherwise.
            headers["content-type"] = "application/json"
        target = self.upstream + scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        try:
            async with self.session().request(
                request.method, target, data=body or None, headers=headers
            ) as upstream:
                response_headers = [
                    (k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in upstream.headers.items()
                    if k.lower() not in HOP_HEADERS or k.lower() == "content-length"
                ]
                await send(
                    {"type": "http.response.start", "status": upstream.status, "headers": response_headers}
                )
                async for chunk in upstream.content.iter_chunked(1 << 16):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except aiohttp.ClientConnectionError as exc:
            await error_response(503, f"the model server is unreachable: {exc}")(scope, receive, send)
        except TimeoutError:
            await error_response(504, "the model server did not answer in time")(scope, receive, send)


class MLServerHost(ModelHost):
    """ModelHost whose readiness also asks MLServer, and which exits if MLServer dies."""

    def __init__(self, *, args: argparse.Namespace, fmt: str) -> None:
        self.args, self.fmt = args, fmt
        self.mlserver: MLServerProcess | None = None
        self.proxy: MLServerProxy | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        super().__init__(
            kind=KIND,
            model_name=args.model_name,
            load=self._start_mlserver,
            inference_paths={infer_path(args.model_name)},
            max_concurrency=1,  # parallel_workers 0: MLServer runs one prediction at a time
        )

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self._loop = asyncio.get_running_loop()
        async with super().lifespan():
            try:
                yield
            finally:
                if self.proxy is not None:
                    await self.proxy.close()

    def _start_mlserver(self) -> ASGIApp:
        """Blocking: prepare MLServer's settings, start it, wait until the model is ready."""
        import aiohttp  # noqa: F401  - the proxy's client: missing, it is a load failure, not a 500 per request

        args = self.args
        venv = find_mlserver_venv(args.mlserver_venv)
        root = Path(tempfile.mkdtemp(prefix="converge-mlserver-"))
        support = v2_restricted.install(root / SUPPORT_DIR)
        env = mlserver_env(venv, support=support)
        model_path = Path(args.model_path).resolve()
        inputs: list[dict[str, Any]] = []
        if self.fmt == "pickle":
            try:
                facts = probe_sklearn(
                    venv / "bin" / "python", model_path, env=env, timeout=args.ready_timeout, support=support
                )
            except BaseException:
                shutil.rmtree(root, ignore_errors=True)
                raise
            inputs = declared_sklearn_inputs(facts)
            log.info("scikit-learn model: %s, inputs %s", facts["type"], inputs or "undeclared")
        http_port, grpc_port = free_port(), free_port()
        folder = write_mlserver_config(
            root,
            model_name=args.model_name,
            model_path=model_path,
            implementation=IMPLEMENTATIONS[self.fmt],
            http_port=http_port,
            grpc_port=grpc_port,
            inputs=inputs,
        )
        self.mlserver = MLServerProcess(venv, folder, env=env, http_port=http_port)
        self.mlserver.on_exit = self._mlserver_exited
        self.mlserver.start()
        self.mlserver.wait_ready(args.model_name, timeout=args.ready_timeout)
        declared = self.mlserver.metadata(args.model_name).get("inputs") or []
        self.proxy = MLServerProxy(
            self.mlserver.base_url,
            model_name=args.model_name,
            declared=declared,
            # MLflow enforces its signature's dtypes; scikit-learn converts any numbers.
            exact_datatype=self.fmt == "mlflow",
        )
        return self.proxy

    def _mlserver_exited(self, code: int) -> None:
        """From the watcher thread: MLServer stopped by itself, so this replica stops too (exit 1)."""
        error = RuntimeError(f"MLServer exited unexpectedly with code {code}")
        log.error("%s; stopping the replica", error)
        if self.model_app is None:
            return  # still loading: wait_ready reports it
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(self._fail, error)

    def _fail(self, error: BaseException) -> None:
        self.load_error = error
        self.model_app = None
        self.on_load_failed()

    async def _ready(self, request: Request) -> JSONResponse:
        if self.model_app is None or self.proxy is None:
            return await super()._ready(request)
        ok, detail = await self.proxy.upstream_ready(self.model_name)
        if ok:
            return JSONResponse({"status": "ready", "model": self.model_name})
        return JSONResponse({"status": "unready", "error": detail}, status_code=503)


# ---------------------------------------------------------------------------------------------
# Entry points used by converge.serving.__main__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="pickle (scikit-learn), mlflow or onnx (default: auto, from the artifact)",
    )
    parser.add_argument(
        "--mlserver-venv",
        default=None,
        help=f"MLServer's virtual environment (default: ${MLSERVER_VENV_ENV}, else {MLSERVER_VENV_DIR} "
        "next to this environment)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=positive_int,
        default=300,
        help="seconds MLServer may take to load the model (default: 300)",
    )


def build_host(args: argparse.Namespace) -> ModelHost:
    try:
        fmt = model_format(Path(args.model_path), args.format)
    except (ValueError, OSError) as exc:
        error = exc

        def fail() -> ASGIApp:
            raise error

        # Reported like any load failure: /health/ready says why, and the replica exits 1.
        return ModelHost(kind=KIND, model_name=args.model_name, load=fail, inference_paths=())
    if fmt == "onnx":
        from converge.serving import v2_onnx

        return v2_onnx.build_host(args)
    return MLServerHost(args=args, fmt=fmt)

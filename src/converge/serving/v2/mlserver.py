"""MLServer as a child process: its settings, its environment, and starting, watching, stopping it.

MLServer cannot share Converge's environment (its fastapi and protobuf pins clash with ours),
so it runs from its own virtual environment (`make mlserver-venv`), like a KServe runtime runs
from its own image. Models load through restricted unpicklers (`restricted`, run inside
MLServer's environment with a copy of `core/pickle_allowlist.py`): the probe and MLServer's
runtimes only import the globals the registration scan allows, as a second line behind that scan.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from converge.serving.v2 import restricted

log = logging.getLogger("converge.serving.v2")

# mlserver_sklearn.SKLearnModel and mlserver_mlflow.MLflowRuntime, loading through the allow-list.
IMPLEMENTATIONS = {
    "pickle": restricted.SKLEARN_RUNTIME,
    "mlflow": restricted.MLFLOW_RUNTIME,
}
# Inside the folder MLServer starts from: the restricted runtimes and the allow-list.
SUPPORT_DIR = "converge-runtime"
STOP_TIMEOUT_S = 10


def probe_sklearn(
    python: Path, model_path: Path, *, env: dict[str, str], timeout: float, support: Path
) -> dict[str, Any]:
    """Load the model once in MLServer's environment and read what its inputs look like.

    It loads the way the runtime will (`restricted`, from `support`), so a model that
    cannot load, or imports a global outside the allow-list, fails here with the loader's own
    error, before MLServer starts.
    """
    proc = subprocess.run(
        [str(python), "-I", "-c", restricted.PROBE, str(model_path), str(support)],
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

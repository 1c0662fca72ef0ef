"""The replica for scikit-learn and MLflow models: MLServer started as a child, the proxy in front.

Converge's `/health/*` and `/converge/stats` come from `ModelHost`; readiness also asks
MLServer, and the replica exits when MLServer dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp

from converge.kit.net import free_port
from converge.serving.common import ModelHost
from converge.serving.v2 import restricted
from converge.serving.v2.formats import find_mlserver_venv, mlflow_code_problem, mlflow_sklearn
from converge.serving.v2.mlserver import (
    IMPLEMENTATIONS,
    SUPPORT_DIR,
    MLServerProcess,
    declared_sklearn_inputs,
    mlserver_env,
    probe_sklearn,
    write_mlserver_config,
)
from converge.serving.v2.protocol import KIND, infer_path
from converge.serving.v2.proxy import MLServerProxy

log = logging.getLogger("converge.serving.v2")


def _mlflow_plan(folder: Path) -> tuple[Path, str, list[dict[str, Any]]]:
    """How to serve an MLflow folder: (what to load, the runtime, declared inputs).

    The scikit-learn flavour goes to the restricted scikit-learn runtime with its model file,
    exactly as a pickle we registered ourselves (and its signature, if any, declares the inputs).
    Any other flavour goes to MLflow's runtime (pickle functions restricted while it loads),
    unless the folder would make MLflow import code of its own.
    """
    sklearn = mlflow_sklearn(folder)
    if sklearn is not None:
        log.info(
            "MLflow scikit-learn model (%s): served restricted from %s",
            sklearn.serialization,
            sklearn.model_file.name,
        )
        return sklearn.model_file, "pickle", sklearn.inputs
    problem = mlflow_code_problem(folder)
    if problem is not None:
        raise RuntimeError(f"refused to serve the MLflow model: {problem}")
    return folder, "mlflow", []


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
        support = restricted.install(root / SUPPORT_DIR)
        env = mlserver_env(venv, support=support)
        model_path = Path(args.model_path).resolve()
        inputs: list[dict[str, Any]] = []
        runtime, exact_datatype = self.fmt, self.fmt == "mlflow"
        try:
            if self.fmt == "mlflow":
                model_path, runtime, inputs = _mlflow_plan(model_path)
                exact_datatype = runtime == "mlflow" or bool(inputs)  # a signature's dtypes are the contract
            if runtime == "pickle":
                facts = probe_sklearn(
                    venv / "bin" / "python", model_path, env=env, timeout=args.ready_timeout, support=support
                )
                inputs = inputs or declared_sklearn_inputs(facts)
                log.info("scikit-learn model: %s, inputs %s", facts["type"], inputs or "undeclared")
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        http_port, grpc_port = free_port(), free_port()
        folder = write_mlserver_config(
            root,
            model_name=args.model_name,
            model_path=model_path,
            implementation=IMPLEMENTATIONS[runtime],
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
            exact_datatype=exact_datatype,
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

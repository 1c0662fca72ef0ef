"""The MLflow client, bounded: every call runs in a thread of its own pool, under a deadline, and
fails fast.

MLflow's client is synchronous and, by default, retries a refused connection seven times with
backoff and waits 120 s for an answer: an unreachable server would hold a request (or a build)
for minutes. Here each call gets one attempt and a socket timeout from the settings, and the
whole call is bounded by `asyncio.wait_for`, so the caller gets a 503 naming the URI instead.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import TYPE_CHECKING, TypeVar

from converge.config import MlflowSettings
from converge.errors import AppError, BadRequest, NotFound

if TYPE_CHECKING:  # mlflow takes over a second to import: only the processes that call it pay
    from mlflow.tracking import MlflowClient

T = TypeVar("T")
POOL_THREADS = 4
CONFIGURE_HINT = (
    "No MLflow tracking server is configured: set CONVERGE_MLFLOW__TRACKING_URI "
    "(e.g. http://127.0.0.1:5000) and restart Converge"
)
# What MLflow answers for an id or name it does not hold (a malformed experiment id, too).
_ABSENT = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"})


class TrackingNotConfigured(AppError):
    status_code, type, title = 503, "mlflow-not-configured", "No MLflow tracking server configured"


class TrackingUnavailable(AppError):
    status_code, type, title = 503, "mlflow-unavailable", "MLflow tracking server unavailable"


def tracking_uri(settings: MlflowSettings) -> str:
    if not settings.tracking_uri:
        raise TrackingNotConfigured(CONFIGURE_HINT)
    return settings.tracking_uri


@lru_cache(maxsize=16)
def client_for(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    # Threads of their own: a call that timed out still holds its thread until MLflow's socket
    # timeout ends it, and a hung server must not take the default executor's few threads from
    # the rest of the process (database start-up, artifact copies).
    return ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="mlflow")


def _fail_fast(timeout_s: float) -> None:
    # MLflow reads these at each request (mlflow.environment_variables), not at import.
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(timeout_s)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"


async def call(
    uri: str,
    fn: Callable[[MlflowClient], T],
    *,
    timeout_s: float,
    absent: str | None = None,
    invalid: str | None = None,
    request_timeout_s: float | None = None,
) -> T:
    """`fn(client)` in a thread, within `timeout_s`. `absent`: the 404 message when MLflow says
    the thing asked for does not exist (or its id is malformed, unless `invalid` is given: then
    that is a 400 with `invalid`); any other failure is a 503 naming the server.
    `request_timeout_s`: each HTTP request's own bound, when it differs from the whole call's."""
    from mlflow.exceptions import MlflowException

    _fail_fast(request_timeout_s or timeout_s)
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.run_in_executor(_pool(), fn, client_for(uri)), timeout_s)
    except TimeoutError as exc:
        raise TrackingUnavailable(
            f"The MLflow tracking server at {uri} did not answer within {timeout_s:g} s",
            extra={"tracking_uri": uri},
        ) from exc
    except MlflowException as exc:
        if invalid is not None and exc.error_code == "INVALID_PARAMETER_VALUE":
            raise BadRequest(invalid) from exc
        if absent is not None and exc.error_code in _ABSENT:
            raise NotFound(absent) from exc
        raise unavailable(uri, exc) from exc
    except OSError as exc:  # a download's disk or socket, outside MLflow's own wrapping
        raise unavailable(uri, exc) from exc


def unavailable(uri: str, exc: BaseException) -> TrackingUnavailable:
    text = str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
    return TrackingUnavailable(
        f"The MLflow tracking server at {uri} could not be used: {text}", extra={"tracking_uri": uri}
    )

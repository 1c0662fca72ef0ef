"""Schemathesis over the whole OpenAPI of the session app: no input is answered with a 5xx
(a 503 problem saying that something the operation needs is not there right now, such as the
ready replica an agent run calls, is an answer to retry, not a server error).

Every operation is driven by Schemathesis' own engine (explicit examples, the coverage phase's
boundary and negative values, then generated positive and negative data) as an organisation
admin, over HTTP to a real uvicorn server serving an app of its own on a database of its own:
its writes really commit (each request its own transaction, as in production), nothing another
test committed is there to meet, and the database is dropped after the test.
(Schemathesis re-sends a request whose connection dropped, so keep-alive after an error is
checked on a raw socket in `test_errors_keepalive.py`.)

Seeded and derandomised: the same code sends the same requests. The release-size run (more
examples, more seeds) is `benchmarks/fuzz/run_schemathesis.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from support import BOOTSTRAP, LiveServer, free_port, make_settings, own_database

from converge.app import create_app
from converge.runtime.fake import FakeBackend

# The release run's harness (config, engine, tally), so both runs fuzz exactly alike.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz"))
from run_schemathesis import _deliberately_unavailable, fuzz_config, in_thread, run_engine  # noqa: E402

MAX_EXAMPLES = 10
SEED = 20261201


async def test_no_input_to_any_operation_gets_a_server_error(pg_url: str, tmp_path: Path) -> None:
    with own_database(pg_url, "fuzz") as url:
        app = create_app(make_settings(url, tmp_path), on_first_key=None, runtime=FakeBackend())
        doc = app.openapi()
        documented = {f"{method.upper()} {path}" for path, item in doc["paths"].items() for method in item}
        async with app.router.lifespan_context(app), LiveServer(app, free_port()) as server:
            config = fuzz_config(base_url=server.url, token=BOOTSTRAP, max_examples=MAX_EXAMPLES, seed=SEED)
            result = await in_thread(run_engine, doc, config)

    assert not result.engine_errors, result.engine_errors
    assert documented <= result.answered, f"never answered: {sorted(documented - result.answered)}"
    assert not result.server_errors, f"{len(result.server_errors)} of {result.examples}:\n" + "\n".join(
        str(error) for error in result.server_errors[:30]
    )
    assert not result.schema_violations, "\n".join(str(v) for v in result.schema_violations[:30])


def test_only_a_503_problem_is_a_deliberate_answer() -> None:
    def answer(status: int, kind: str) -> Any:
        return type("Response", (), {"status_code": status, "headers": {"Content-Type": [kind]}})()

    assert _deliberately_unavailable(answer(503, "application/problem+json"))
    assert not _deliberately_unavailable(answer(503, "application/json"))  # e.g. /readiness failing
    assert not _deliberately_unavailable(answer(500, "application/problem+json"))
    assert not _deliberately_unavailable(answer(502, "application/problem+json"))

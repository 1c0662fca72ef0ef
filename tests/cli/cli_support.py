"""What the CLI tests share besides fixtures (those are in conftest.py): the runner and checks."""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner, Result

from converge.cli.main import app as cli_app

Env = dict[str, str | None]


@dataclass
class Cli:
    """`await cli("models", "list")` runs `converge models list` against the test server.

    The CLI's httpx client is synchronous and the server runs in the test's event loop, so every
    invocation runs in a worker thread; calling it on the loop thread would deadlock.
    """

    url: str
    admin_token: str
    config: Path  # the isolated profile file (CONVERGE_CLI_CONFIG)

    def env(self, **overrides: str | None) -> Env:
        base: Env = {
            "CONVERGE_CLI_CONFIG": str(self.config),
            "CONVERGE_URL": self.url,
            "CONVERGE_API_KEY": self.admin_token,
            "NO_COLOR": "1",
        }
        return {**base, **overrides}

    async def __call__(self, *args: str, env: Env | None = None, token: str | None = None) -> Result:
        """Run with the admin key, with `token` instead, or with exactly `env`."""
        if env is None:
            env = self.env(CONVERGE_API_KEY=token) if token else self.env()
        return await asyncio.to_thread(CliRunner().invoke, cli_app, list(args), env=env)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ok(result: Result) -> Result:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


def failed(result: Result) -> Result:
    assert result.exit_code == 1, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit)  # a deliberate exit, not a crash
    assert "Traceback" not in result.output
    return result


def row(text: str, *cells: str) -> bool:
    """Whether one line of `text` holds these cells in order (table borders and padding between)."""
    pattern = r"[\s│┃]+".join(re.escape(c) for c in cells)
    return any(re.search(pattern, line) for line in text.splitlines())

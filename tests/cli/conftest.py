"""Fixtures of the CLI tests: a real server on a loopback port and a `Cli` that drives it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cli_support import Cli
from rich.console import Console

from converge.cli import output


@pytest.fixture
async def server(live_server: Any) -> AsyncIterator[Any]:
    async with live_server() as srv:
        yield srv


@pytest.fixture
def cli(server: Any, settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    assert settings.bootstrap_token is not None
    # The CLI's consoles fix their width when created if COLUMNS is set then (xdist workers set it);
    # wide ones keep rich from folding a table cell or an error line that a test looks for. Every
    # command prints through these two.
    monkeypatch.setattr(output, "console", Console(width=250))
    monkeypatch.setattr(output, "err", Console(stderr=True, width=250))
    return Cli(
        url=server.url,
        admin_token=settings.bootstrap_token.get_secret_value(),
        config=tmp_path / "cli.json",
    )

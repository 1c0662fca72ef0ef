"""`converge cost estimate | prices` through CliRunner against the session app on a real port.

The `client` fixture puts the app's sessions on a rolled-back transaction, so the served
requests and the library rows made here leave nothing behind.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from rich.console import Console
from test_estimate_api import LLAMA2_7B_F16, library_version
from typer.testing import CliRunner, Result

from converge.cli import output
from converge.cli.main import app as cli_app

GIB = 2**30


@pytest.fixture
async def cost_cli(client, live_server, settings, tmp_path, monkeypatch) -> AsyncIterator[Any]:
    # Wide consoles: rich does not fold a cell the test looks for.
    monkeypatch.setattr(output, "console", Console(width=250))
    monkeypatch.setattr(output, "err", Console(stderr=True, width=250))
    async with live_server() as server:
        env = {
            "CONVERGE_CLI_CONFIG": str(tmp_path / "cli.json"),
            "CONVERGE_URL": server.url,
            "CONVERGE_API_KEY": settings.bootstrap_token.get_secret_value(),
            "NO_COLOR": "1",
        }

        async def run(*args: str) -> Result:
            # The CLI's client is synchronous and the server runs on this loop: a thread each.
            return await asyncio.to_thread(CliRunner().invoke, cli_app, ["cost", *args], env=env)

        yield run


def row(text: str, *cells: str) -> bool:
    pattern = r"[\s│┃|]+".join(re.escape(c) for c in cells)
    return any(re.search(pattern, line) for line in text.splitlines())


async def test_estimate_prints_the_memory_fit_and_the_cost_table(app, cost_cli):
    version = await library_version(app, inspection=LLAMA2_7B_F16)
    result = await cost_cli("estimate", f"{version['model']}:v1", "--context", "8192", "--concurrency", "16")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert row(out, "device", "1 x H200 per replica")
    assert row(out, "weights", "6,738,415,616 parameters x 2 bytes per weight")
    assert row(
        out, "kv_cache", "524,288 bytes x 8,192 tokens of context x 16 concurrent requests", "68.72 GB"
    )
    assert row(out, "need", "13.48 GB weights + 68.72 GB KV cache + 9.29 GB overhead", "91.49 GB")
    assert row(out, "GPU H200 (on-demand)", "1 GPU-hour", "4.60 USD", "4.60 USD", "3,358.00 USD")
    storage_month = 13_478_104_576 / GIB * 0.08
    total_hour = 4.60 + 0.04 + 0.01 + storage_month / 730
    assert row(out, "Total", f"{total_hour:,.2f} USD", f"{total_hour * 730:,.2f} USD")
    assert row(out, "2 x L40S", "3.00 USD")  # a cheaper split, shown beside the one GPU chosen


async def test_estimate_json_and_a_named_gpu(app, cost_cli):
    version = await library_version(app, inspection=LLAMA2_7B_F16)
    args = ("estimate", version["model"], "--context", "8192", "--concurrency", "16", "--gpu", "H100")
    result = await cost_cli(*args, "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["per_replica"]["gpu"]["device"] == "H100" and body["per_replica"]["gpu"]["count"] == 2
    assert body["memory"]["need_bytes"] == 91_489_680_589


async def test_an_unknown_gpu_type_exits_1_listing_the_known_ones(app, cost_cli):
    version = await library_version(app, inspection=LLAMA2_7B_F16)
    result = await cost_cli("estimate", version["model"], "--gpu", "B200")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert (
        "Error 422: Unknown GPU type 'B200'; known: A100-40GB, A100-80GB, H100, H200, L4, L40S"
        in result.stderr
    )


async def test_prices_show_every_zone_and_json_is_the_catalogue(cost_cli):
    result = await cost_cli("prices")
    assert result.exit_code == 0, result.output
    assert row(result.stdout, "GPU H100 (80 GB)", "GPU-hour", "3.90 USD", "1.95 USD", "1g.10gb, 1g.20gb")
    assert row(result.stdout, "CPU", "core-hour", "0.04 USD", "0.012 USD")
    assert "Zone default (default)" in result.stdout and "Zone eu-west" in result.stdout
    raw = await cost_cli("prices", "--json", "--version", "1")
    assert json.loads(raw.stdout)["version"] == 1

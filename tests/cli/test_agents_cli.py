"""`converge mcp-servers ...` and `converge agents ...` against a real server: register the test
MCP server (stdio), check it, make an agent with its tools, run a scripted two-tool task and
read the tool calls, update (a new revision), delete; errors are one readable line."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from cli_support import Cli, failed, ok, row, unique
from scripted_llm import ScriptedLlm, call, chat_deployment, routed
from support import make_key, make_project

SERVER = Path(__file__).parents[1] / "chat" / "mcp_tools_server.py"


async def test_mcp_servers_and_agents_from_the_cli(app: Any, cli: Cli, committed_client: Any) -> None:
    project = await make_project(committed_client)
    p = project["id"]
    async with ScriptedLlm() as llm:
        deployment = await chat_deployment(app, committed_client, project_id=p, llm=llm, name=unique("bot"))
        await routed(app, deployment, llm)

        command = shlex.join([sys.executable, str(SERVER), "stdio"])
        ok(await cli("mcp-servers", "add", "tools", "-p", p, "--command", command, "--env", "A=1"))
        listed = ok(await cli("mcp-servers", "list", "-p", p)).output
        assert row(listed, "tools", "stdio")
        checked = ok(await cli("mcp-servers", "check", "tools", "-p", p)).output
        assert row(checked, "lookup_capital", "mcp__tools__lookup_capital")

        # A project owner's key may not register a stdio server: one readable line, exit 1.
        owner = (await make_key(committed_client, p, "owner"))["Authorization"].removeprefix("Bearer ")
        refused = failed(await cli("mcp-servers", "add", "x", "-p", p, "--command", "/bin/true", token=owner))
        assert "Error 403" in refused.output and "organisation admins" in refused.output

        name = unique("helper")
        made = await cli(
            "agents", "create", name, "-p", p, "-d", deployment["name"], "--mcp", "tools", "--max-steps", "4"
        )
        assert row(ok(made).output, "tools", "mcp:tools")
        assert row(ok(await cli("agents", "list", "-p", p)).output, name, "1", deployment["name"])

        llm.reply(
            tool_calls=[call("mcp__tools__convert_units", {"value": 2, "from_unit": "kg", "to_unit": "lb"})]
        )
        llm.reply(tool_calls=[call("mcp__tools__lookup_capital", {"country": "Kenya"})])
        llm.reply("2 kg is 4.4092 lb; Nairobi.")
        ran = ok(await cli("agents", "run", name, "2 kg in lb, and Kenya's capital?", "-p", p)).output
        assert row(ran, "1", "mcp__tools__convert_units")
        assert "2 kg = 4.4092 lb" in ran and "Nairobi" in ran
        assert "stop: stop; 3 model calls" in ran

        llm.reply(tool_calls=[call("mcp__tools__explode", {})])
        llm.reply("It failed.")
        raw = json.loads(ok(await cli("agents", "run", name, "explode", "-p", p, "--json")).output)
        assert raw["steps"][0]["error"].endswith("the explode tool failed on purpose")

        updated = ok(
            await cli("agents", "update", name, "-p", p, "--system", "Be brief.", "--no-tools")
        ).output
        assert row(updated, "revision", "2") and row(updated, "system prompt", "Be brief.")
        shown = json.loads(ok(await cli("agents", "show", name, "-p", p, "--json")).output)
        assert shown["spec"]["tools"]["mcp_servers"] == []

        missing = failed(await cli("agents", "create", unique("x"), "-p", p, "-d", "no-such-deployment"))
        assert "Error 404" in missing.output and "no-such-deployment" in missing.output

        ok(await cli("agents", "delete", name, "-p", p, "--yes"))
        ok(await cli("mcp-servers", "delete", "tools", "-p", p, "--yes"))
        assert "tools" not in ok(await cli("mcp-servers", "list", "-p", p)).output

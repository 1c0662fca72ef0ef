"""`converge rulesets ...` against a real server: create from options, update (a new version),
show with versions, attach to a deployment, refused delete while attached, detach, delete."""

from __future__ import annotations

import json
from typing import Any

from cli_support import Cli, failed, ok, row, unique
from scripted_llm import ScriptedLlm, chat_deployment
from support import make_project


async def test_rulesets_from_the_cli(app: Any, cli: Cli, committed_client: Any) -> None:
    project = await make_project(committed_client)
    p = project["id"]
    async with ScriptedLlm() as llm:
        deployment = await chat_deployment(app, committed_client, project_id=p, llm=llm, name=unique("bot"))
    name = unique("house")
    made = ok(
        await cli(
            "rulesets",
            "create",
            name,
            "-p",
            p,
            "--system",
            "Be brief.",
            "--block",
            "zeus",
            "--pattern",
            r"ticket=T-\d+",
            "--output-redact",
            "email",
            "--json",
        )
    ).output
    spec = json.loads(made)["spec"]
    assert spec["input"]["patterns"] == [{"name": "ticket", "regex": r"T-\d+"}]
    assert spec["output"]["redact"] == ["email"] and spec["system"] == "Be brief."

    updated = json.loads(
        ok(await cli("rulesets", "update", name, "-p", p, "--max-tokens", "32", "--json")).output
    )
    assert updated["version"] == 2 and updated["spec"]["output"]["max_tokens"] == 32
    assert updated["spec"]["input"]["blocked_terms"] == ["zeus"]  # the rest of the spec is kept
    shown = ok(await cli("rulesets", "show", name, "-p", p, "--versions")).output
    assert row(shown, "2") and row(shown, "1")
    assert row(ok(await cli("rulesets", "list", "-p", p)).output, name, "2", "0")

    bad = failed(await cli("rulesets", "create", unique("bad"), "-p", p, "--pattern", "x=(a+)+"))
    assert "spec.input.patterns[0].regex" in bad.output

    ok(await cli("rulesets", "attach", name, deployment["name"], "-p", p))
    assert row(ok(await cli("rulesets", "list", "-p", p)).output, name, "2", "1")
    refused = failed(await cli("rulesets", "delete", name, "-p", p, "--yes"))
    assert "Error 409" in refused.output and deployment["name"] in refused.output
    ok(await cli("rulesets", "detach", name, deployment["name"], "-p", p))
    ok(await cli("rulesets", "delete", name, "-p", p, "--yes"))
    assert name not in ok(await cli("rulesets", "list", "-p", p)).output

"""`converge agents ...` and `converge mcp-servers ...`: agents (a chat model with tools, a step
limit and a token budget) and the project's MCP tool servers."""

from __future__ import annotations

import json
import shlex
from typing import Annotated, Any

import typer
from rich.text import Text

from converge.cli.client import SLOW, Api, ProfileOpt, YesOpt, api
from converge.cli.output import die, echo, fields, table, when

agents = typer.Typer(
    help="Agents: a chat model with tools, a step limit and a token budget.", no_args_is_help=True
)
mcp_servers = typer.Typer(help="MCP tool servers that a project's agents may use.", no_args_is_help=True)
ProjectOpt = Annotated[str, typer.Option("--project", "-p", help="Project name or id")]
AgentArg = Annotated[str, typer.Argument(help="Agent name or id")]
ServerArg = Annotated[str, typer.Argument(help="MCP server name or id")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the raw answer")]
ListOpt = list[str] | None


def _find(client: Api, path: str, *, project_id: str, ref: str, what: str) -> dict[str, Any]:
    found = client.named(path, ref, params={"project": project_id})
    if found is None:
        die(f"No {what} '{ref}' in this project")
    return found


def _tools(
    *, kb: list[str] | None, fetch: list[str] | None, mcp: list[str] | None, k: int | None
) -> dict[str, Any]:
    tools: dict[str, Any] = {"mcp_servers": list(mcp or [])}
    if kb:
        tools["knowledge_base_search"] = {"knowledge_bases": kb, **({"k": k} if k else {})}
    if fetch:
        tools["http_fetch"] = {"allow": fetch}
    return tools


KbOpt = Annotated[ListOpt, typer.Option("--kb", help="A knowledge base it may search (repeatable)")]
FetchOpt = Annotated[
    ListOpt, typer.Option("--fetch-allow", help="A URL prefix http_fetch may GET (repeatable)")
]
McpOpt = Annotated[ListOpt, typer.Option("--mcp", help="An MCP server whose tools it gets (repeatable)")]
KOpt = Annotated[int | None, typer.Option("--kb-k", help="Chunks per knowledge-base search")]
RulesetOpt = Annotated[str | None, typer.Option("--ruleset", help="A ruleset of the project")]
SystemOpt = Annotated[str | None, typer.Option("--system", help="The system prompt")]
StepsOpt = Annotated[int | None, typer.Option("--max-steps", help="Model calls per run, at most (1-50)")]
BudgetOpt = Annotated[int | None, typer.Option("--token-budget", help="Prompt + completion tokens per run")]


@agents.command("create")
def agents_create(
    name: Annotated[str, typer.Argument(help="Name, unique in the project; also its model name in /v1")],
    *,
    project: ProjectOpt,
    deployment: Annotated[str, typer.Option("--deployment", "-d", help="The chat deployment it calls")],
    ruleset: RulesetOpt = None,
    system: SystemOpt = None,
    kb: KbOpt = None,
    kb_k: KOpt = None,
    fetch_allow: FetchOpt = None,
    mcp: McpOpt = None,
    max_steps: StepsOpt = None,
    token_budget: BudgetOpt = None,
    description: Annotated[str, typer.Option(help="What it is for")] = "",
    profile: ProfileOpt = None,
) -> None:
    """Create an agent."""
    client = api(profile)
    body: dict[str, Any] = {"name": name, "description": description, "chat_deployment": deployment}
    body["tools"] = _tools(kb=kb, fetch=fetch_allow, mcp=mcp, k=kb_k)
    optional = {
        "ruleset": ruleset,
        "system_prompt": system,
        "max_steps": max_steps,
        "token_budget": token_budget,
    }
    body |= {key: value for key, value in optional.items() if value is not None}
    _show(client.call("POST", "/agents", params={"project": client.project_id(project)}, json=body))


@agents.command("list")
def agents_list(project: ProjectOpt, profile: ProfileOpt = None) -> None:
    """The project's agents."""
    client = api(profile)
    rows = [
        {
            "name": a["name"],
            "revision": a["revision"],
            "deployment": a["spec"]["chat_deployment"]["name"],
            "tools": ", ".join(_tool_names(a["spec"])) or "-",
            "updated": when(a.get("updated_at")),
            "id": a["id"],
        }
        for a in client.paged("/agents", params={"project": client.project_id(project)})
    ]
    table(rows, ["name", "revision", "deployment", "tools", "updated", "id"])


def _tool_names(spec: dict[str, Any]) -> list[str]:
    tools = spec.get("tools") or {}
    names = []
    if tools.get("knowledge_base_search"):
        kbs = ", ".join(b["name"] for b in tools["knowledge_base_search"]["knowledge_bases"])
        names.append(f"knowledge_base_search ({kbs})")
    if tools.get("http_fetch"):
        names.append("http_fetch")
    names += [f"mcp:{s['name']}" for s in tools.get("mcp_servers") or []]
    return names


@agents.command("show")
def agents_show(
    ref: AgentArg, *, project: ProjectOpt, as_json: JsonOpt = False, profile: ProfileOpt = None
) -> None:
    """An agent's current revision."""
    client = api(profile)
    found = _find(client, "/agents", project_id=client.project_id(project), ref=ref, what="agent")
    agent = client.call("GET", f"/agents/{found['id']}")
    if as_json:
        echo(json.dumps(agent, indent=2))
        return
    _show(agent)


def _show(a: dict[str, Any]) -> None:
    spec = a["spec"]
    fetch = (spec.get("tools") or {}).get("http_fetch") or {}
    fields(
        [
            ("name", a["name"]),
            ("id", a["id"]),
            ("revision", a["revision"]),
            ("description", a.get("description")),
            ("chat deployment", spec["chat_deployment"]["name"]),
            ("ruleset", (spec.get("ruleset") or {}).get("name")),
            ("system prompt", spec.get("system_prompt") or None),
            ("tools", ", ".join(_tool_names(spec)) or None),
            ("http_fetch allows", ", ".join(fetch.get("allow") or []) or None),
            ("max steps", spec.get("max_steps")),
            ("token budget", spec.get("token_budget")),
        ],
        title="agent",
    )


@agents.command("update")
def agents_update(
    ref: AgentArg,
    *,
    project: ProjectOpt,
    deployment: Annotated[str | None, typer.Option("--deployment", "-d", help="The chat deployment")] = None,
    ruleset: RulesetOpt = None,
    no_ruleset: Annotated[bool, typer.Option("--no-ruleset", help="Clear the ruleset")] = False,
    system: SystemOpt = None,
    kb: KbOpt = None,
    kb_k: KOpt = None,
    fetch_allow: FetchOpt = None,
    mcp: McpOpt = None,
    no_tools: Annotated[bool, typer.Option("--no-tools", help="Remove every tool")] = False,
    max_steps: StepsOpt = None,
    token_budget: BudgetOpt = None,
    description: Annotated[str | None, typer.Option(help="What it is for")] = None,
    profile: ProfileOpt = None,
) -> None:
    """Change an agent; a change to its spec is a new revision. Tool options replace all its tools."""
    client = api(profile)
    found = _find(client, "/agents", project_id=client.project_id(project), ref=ref, what="agent")
    body: dict[str, Any] = {}
    given = {
        "chat_deployment": deployment,
        "ruleset": ruleset,
        "system_prompt": system,
        "max_steps": max_steps,
        "token_budget": token_budget,
        "description": description,
    }
    body |= {key: value for key, value in given.items() if value is not None}
    if no_ruleset:
        body["ruleset"] = None
    if no_tools:
        body["tools"] = {}
    elif kb or fetch_allow or mcp:
        body["tools"] = _tools(kb=kb, fetch=fetch_allow, mcp=mcp, k=kb_k)
    if not body:
        die("Nothing to change: give at least one option")
    _show(client.call("PATCH", f"/agents/{found['id']}", json=body))


@agents.command("delete")
def agents_delete(
    ref: AgentArg, *, project: ProjectOpt, yes: YesOpt = False, profile: ProfileOpt = None
) -> None:
    """Delete an agent and its revisions."""
    client = api(profile)
    found = _find(client, "/agents", project_id=client.project_id(project), ref=ref, what="agent")
    client.delete(f"/agents/{found['id']}", ask=None if yes else f"Delete agent '{found['name']}'?")
    echo(f"deleted agent {found['name']}")


@agents.command("run")
def agents_run(
    ref: AgentArg,
    message: Annotated[str, typer.Argument(help="What you ask the agent")],
    *,
    project: ProjectOpt,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Run an agent once: its tool calls (arguments, results, errors), then its answer."""
    client = api(profile)
    found = _find(client, "/agents", project_id=client.project_id(project), ref=ref, what="agent")
    body = {"messages": [{"role": "user", "content": message}]}
    result = client.call("POST", f"/agents/{found['id']}/run", json=body, timeout=SLOW)
    if as_json:
        echo(json.dumps(result, indent=2))
        return
    if result["steps"]:
        rows = [
            {
                "step": s["step"],
                "tool": s["tool"],
                "arguments": json.dumps(s["arguments"])
                if not isinstance(s["arguments"], str)
                else s["arguments"],
                "result": " ".join((s["result"] or "").split())[:120] if s["error"] is None else "",
                "error": s["error"] or "",
                "ms": round(s["duration_ms"]),
            }
            for s in result["steps"]
        ]
        table(rows, ["step", "tool", "arguments", "result", "error", "ms"], title="tool calls")
    echo(Text(result["message"].get("content") or ""))
    usage = result["usage"]
    echo(
        Text(
            f"stop: {result['stop_reason']}; {len(result['turns'])} model calls, "
            f"{usage['total_tokens']} tokens ({usage['prompt_tokens']} prompt, {usage['completion_tokens']} completion)",
            style="dim",
        )
    )


# -- MCP servers -------------------------------------------------------------------------------


@mcp_servers.command("add")
def mcp_add(
    name: Annotated[
        str, typer.Argument(help="Name, unique in the project (its tools are mcp__<name>__<tool>)")
    ],
    *,
    project: ProjectOpt,
    url: Annotated[str | None, typer.Option("--url", help="A streamable-HTTP endpoint")] = None,
    command: Annotated[
        str | None,
        typer.Option("--command", help="A stdio server's command line (split like a shell; admins only)"),
    ] = None,
    env: Annotated[ListOpt, typer.Option("--env", help="KEY=VALUE for a stdio server (repeatable)")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds to start and per call")] = None,
    profile: ProfileOpt = None,
) -> None:
    """Register an MCP server: --url (streamable HTTP) or --command (stdio, run on the Converge host)."""
    if (url is None) == (command is None):
        die("Give exactly one of --url or --command")
    client = api(profile)
    body: dict[str, Any] = {"name": name, "transport": "http" if url else "stdio"}
    if url:
        body["url"] = url
    else:
        assert command is not None
        body["command"] = shlex.split(command)
        pairs = [item.partition("=") for item in env or []]
        if any(not sep or not k for k, sep, _ in pairs):
            die("--env takes KEY=VALUE")
        body["env"] = {k: v for k, _, v in pairs}
    if timeout is not None:
        body["timeout_s"] = timeout
    made = client.call("POST", "/mcp-servers", params={"project": client.project_id(project)}, json=body)
    echo(f"registered MCP server [bold]{made['name']}[/] ({made['transport']}) {made['id']}")


@mcp_servers.command("list")
def mcp_list(project: ProjectOpt, profile: ProfileOpt = None) -> None:
    """The project's MCP servers."""
    client = api(profile)
    rows = [
        {
            "name": s["name"],
            "transport": s["transport"],
            "endpoint": s["url"] or shlex.join(s["command"] or []),
            "timeout s": s["timeout_s"],
            "id": s["id"],
        }
        for s in client.paged("/mcp-servers", params={"project": client.project_id(project)})
    ]
    table(rows, ["name", "transport", "endpoint", "timeout s", "id"])


@mcp_servers.command("check")
def mcp_check(
    ref: ServerArg, *, project: ProjectOpt, as_json: JsonOpt = False, profile: ProfileOpt = None
) -> None:
    """Start the server and list its tools (the names agents' models see)."""
    client = api(profile)
    found = _find(client, "/mcp-servers", project_id=client.project_id(project), ref=ref, what="MCP server")
    result = client.call("POST", f"/mcp-servers/{found['id']}/check", timeout=SLOW)
    if as_json:
        echo(json.dumps(result, indent=2))
        return
    rows = [
        {"tool": t["name"], "function": t["function"], "description": t["description"][:100]}
        for t in result["tools"]
    ]
    table(
        rows,
        ["tool", "function", "description"],
        title=f"{found['name']}: {len(rows)} tools in {result['took_ms']} ms",
    )


@mcp_servers.command("delete")
def mcp_delete(
    ref: ServerArg, *, project: ProjectOpt, yes: YesOpt = False, profile: ProfileOpt = None
) -> None:
    """Remove an MCP server (refused while an agent offers its tools)."""
    client = api(profile)
    found = _find(client, "/mcp-servers", project_id=client.project_id(project), ref=ref, what="MCP server")
    client.delete(f"/mcp-servers/{found['id']}", ask=None if yes else f"Remove MCP server '{found['name']}'?")
    echo(f"removed MCP server {found['name']}")

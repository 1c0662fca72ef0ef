"""`converge policies ...`: CEL rules that decide registration, approval and deployment."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.text import Text

from converge.cli.client import Api, ProfileOpt, YesOpt, api, fail
from converge.cli.model_views import outcome_label
from converge.cli.output import die, echo, fields, note, table, when, yes_no

policies = typer.Typer(
    help="Policies: CEL rules that decide registration, approval and deployment.", no_args_is_help=True
)
PolicyArg = Annotated[str, typer.Argument(help="Policy name or id")]


class Effect(StrEnum):
    deny = "deny"
    warn = "warn"
    approve = "approve"


class Scope(StrEnum):
    registration = "registration"
    approval = "approval"
    deployment = "deployment"


def get_policy(client: Api, ref: str) -> dict[str, Any]:
    policy = client.lookup("/policies", ref)
    if policy is None:
        die(f"No policy named '{ref}'; `converge policies list` shows them")
    return policy


def call_expression(client: Api, method: str, path: str, expression: str | None, **kwargs: Any) -> Any:
    """Like Api.call; a CEL syntax error is shown under the expression with a caret."""
    resp = client.send(method, path, **kwargs)
    if resp.status_code == 422 and expression:
        try:
            problem = resp.json()
        except ValueError:
            problem = {}
        line, column = problem.get("line"), problem.get("column")
        if isinstance(line, int) and isinstance(column, int):
            lines = expression.splitlines() or [""]
            source = lines[min(max(line, 1), len(lines)) - 1]
            note(f"[red]Error 422:[/] {escape(str(problem.get('detail')))}")
            note(Text(f"  {line:>3} | {source}"))
            die(Text(" " * (8 + max(column - 1, 0)) + "^", style="bold red"))
    if resp.status_code >= 400:
        fail(resp)
    return resp.json() if resp.content else None


def show_policy(policy: dict[str, Any]) -> None:
    fields(
        [
            ("name", Text(policy["name"], style="bold")),
            ("id", policy["id"]),
            ("scope", policy["scope"]),
            ("effect", policy["effect"]),
            ("enabled", yes_no(policy["enabled"])),
            ("expression", policy["expression"]),
            ("message", policy["message"]),
            ("revision", policy["revision"]),
            ("built in", policy["builtin"]),
            ("updated by", policy["updated_by"]),
            ("created", when(policy.get("created_at"))),
        ]
    )


@policies.command("list")
def policies_list(
    scope: Annotated[Scope | None, typer.Option(help="Only policies of this scope")] = None,
    profile: ProfileOpt = None,
) -> None:
    """All policies: what each checks, when, and what failing it does."""
    params = {"limit": 500, **({"scope": scope.value} if scope else {})}
    rows = [{**r, "enabled": yes_no(r["enabled"])} for r in api(profile).paged("/policies", params=params)]
    columns = ["name", "scope", "effect", "enabled", "revision", "expression"]
    table(rows, columns, title="Policies")


@policies.command("show")
def policies_show(name: PolicyArg, profile: ProfileOpt = None) -> None:
    """One policy and its revision history."""
    client = api(profile)
    policy = get_policy(client, name)
    show_policy(policy)
    revisions = client.call("GET", f"/policies/{policy['id']}/revisions")
    rows = [{**r, "created_at": when(r.get("created_at"))} for r in revisions]
    table(rows, ["revision", "enabled", "effect", "expression", "author", "created_at"], title="Revisions")


@policies.command("create")
def policies_create(
    name: Annotated[str, typer.Option("--name", help="Lowercase name, e.g. require-license")],
    expression: Annotated[
        str, typer.Option(help="CEL; true means the rule passes. `converge policies facts` lists the inputs")
    ],
    message: Annotated[str, typer.Option(help="Shown when the rule fails")],
    effect: Annotated[Effect, typer.Option(help="deny blocks, warn reports, approve auto-approves")],
    scope: Annotated[Scope, typer.Option(help="When the rule runs")],
    enabled: Annotated[
        bool, typer.Option("--enable/--disable", help="Create it switched on or off (try it with dry-run)")
    ] = True,
    profile: ProfileOpt = None,
) -> None:
    """Create a policy. The expression is checked by the server before it is stored."""
    body = {
        "name": name,
        "expression": expression,
        "message": message,
        "effect": effect.value,
        "scope": scope.value,
        "enabled": enabled,
    }
    policy = call_expression(api(profile), "POST", "/policies", expression, json=body)
    echo(f"Created policy [bold]{escape(policy['name'])}[/] ({policy['id']})")
    show_policy(policy)


@policies.command("update")
def policies_update(
    name: PolicyArg,
    expression: Annotated[str | None, typer.Option(help="New CEL expression")] = None,
    message: Annotated[str | None, typer.Option(help="New failure message")] = None,
    effect: Annotated[Effect | None, typer.Option(help="New effect")] = None,
    enabled: Annotated[bool | None, typer.Option("--enable/--disable", help="Switch on or off")] = None,
    profile: ProfileOpt = None,
) -> None:
    """Change a policy; every change is stored as a new revision."""
    body = {
        "expression": expression,
        "message": message,
        "effect": effect.value if effect else None,
        "enabled": enabled,
    }
    body = {k: v for k, v in body.items() if v is not None}
    if not body:
        die("Nothing to change: pass --expression, --message, --effect, --enable or --disable")
    client = api(profile)
    policy = get_policy(client, name)
    updated = call_expression(client, "PATCH", f"/policies/{policy['id']}", expression, json=body)
    echo(f"Updated policy [bold]{escape(updated['name'])}[/]: revision {updated['revision']}")
    show_policy(updated)


@policies.command("delete")
def policies_delete(name: PolicyArg, yes: YesOpt = False, profile: ProfileOpt = None) -> None:
    """Delete a policy (to keep its history, `update --disable` it instead)."""
    client = api(profile)
    policy = get_policy(client, name)
    client.delete(f"/policies/{policy['id']}", ask=None if yes else f"Delete policy {policy['name']}?")
    echo(f"Deleted policy {escape(policy['name'])}")


@policies.command("dry-run")
def policies_dry_run(
    name: PolicyArg,
    expression: Annotated[
        str | None, typer.Option(help="Try this draft expression instead of the stored one")
    ] = None,
    message: Annotated[str | None, typer.Option(help="Draft failure message")] = None,
    effect: Annotated[Effect | None, typer.Option(help="Draft effect")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Newest versions to evaluate")] = 100,
    profile: ProfileOpt = None,
) -> None:
    """What a policy (or a draft of it) would decide for existing versions. Changes nothing."""
    client = api(profile)
    policy = get_policy(client, name)
    body: dict[str, object] = {
        "expression": expression,
        "message": message,
        "effect": effect.value if effect else None,
    }
    body = {k: v for k, v in body.items() if v is not None} | {"limit": limit}
    result = call_expression(client, "POST", f"/policies/{policy['id']}/dry-run", expression, json=body)
    draft = " (draft)" if expression or message or effect else ""
    echo(
        f"Dry run of [bold]{escape(result['policy'])}[/]{draft}: {result['evaluated']} version(s) evaluated: "
        f"[green]{result['passed']} pass[/], [red]{result['failed']} fail[/], {result['errors']} error. "
        "Nothing was changed."
    )
    rows = [
        {**r, "outcome": outcome_label({"outcome": r["outcome"], "effect": effect or policy["effect"]})}
        for r in result["results"]
    ]
    if rows:
        table(rows, ["model", "version", "state", "outcome", "message"])


@policies.command("facts")
def policies_facts(profile: ProfileOpt = None) -> None:
    """Every fact a policy expression can read, e.g. inspection.license or scan.status."""
    doc = api(profile).call("GET", "/policies/facts")
    rows = [
        {"fact": f"{section}.{key}", "meaning": meaning}
        for section, keys in doc.items()
        for key, meaning in keys.items()
    ]
    table(rows, ["fact", "meaning"], title="Policy facts")

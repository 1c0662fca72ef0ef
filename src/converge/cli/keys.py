"""`converge keys ...`: API keys of the organisation or of one project."""

from __future__ import annotations

from typing import Annotated

import typer

from converge.cli.client import Api, ProfileOpt, api
from converge.cli.output import echo, note, table

keys = typer.Typer(help="API keys.", no_args_is_help=True)


def keys_path(client: Api, project: str | None) -> str:
    """Where a project's keys live, or the organisation's when no project is named."""
    return f"/projects/{client.project_id(project)}/keys" if project else "/keys"


@keys.command("list")
def keys_list(
    project: Annotated[
        str | None, typer.Option(help="Project name or id; omit for organisation keys")
    ] = None,
    profile: ProfileOpt = None,
) -> None:
    client = api(profile)
    cols = ["id", "name", "prefix", "role", "expires_at", "revoked_at", "last_used_at"]
    table(list(client.paged(keys_path(client, project))), cols, title="API keys")


@keys.command("create")
def keys_create(
    name: str,
    project: Annotated[
        str | None,
        typer.Option(help="Project name or id; omit for an organisation key (admins create those)"),
    ] = None,
    role: Annotated[
        str | None,
        typer.Option(
            help="Project key: viewer | developer (default) | owner. "
            "Organisation key: admin (default) | library-approver (governs the Model Library only)"
        ),
    ] = None,
    expires_in_days: Annotated[int | None, typer.Option(help="Days until expiry")] = 90,
    profile: ProfileOpt = None,
) -> None:
    client = api(profile)
    default_role = "developer" if project else "admin"
    body = {"name": name, "role": role or default_role, "expires_in_days": expires_in_days}
    k = client.call("POST", keys_path(client, project), json=body)
    note(f"Key [bold]{k['name']}[/] ({k['role']}) created. It is shown only once:")
    print(k["token"])  # alone on stdout, so it can be piped


@keys.command("revoke")
def keys_revoke(
    key_id: str,
    project: Annotated[str | None, typer.Option(help="Project name or id of a project key")] = None,
    profile: ProfileOpt = None,
) -> None:
    client = api(profile)
    k = client.call("DELETE", f"{keys_path(client, project)}/{key_id}")
    echo(f"Revoked key {k['name']} ({k['prefix']})")

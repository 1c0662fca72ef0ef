"""`converge projects ...` and `converge members ...`: tenants and who works in them."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from converge.cli.client import ProfileOpt, YesOpt, api
from converge.cli.output import echo, table

projects = typer.Typer(help="Projects (tenants).", no_args_is_help=True)
members = typer.Typer(help="Project members and their roles.", no_args_is_help=True)


class Environment(StrEnum):
    production = "production"
    staging = "staging"
    development = "development"


EnvironmentOpt = Annotated[
    Environment | None,
    typer.Option(help="What the project is for (a development project is advised spot capacity)"),
]


@projects.command("list")
def projects_list(profile: ProfileOpt = None) -> None:
    rows = list(api(profile).paged("/projects"))
    table(rows, ["id", "name", "environment", "your_role", "description", "created_at"], title="Projects")


@projects.command("create")
def projects_create(
    name: str,
    description: Annotated[str, typer.Option(help="Free text")] = "",
    cpu: Annotated[float | None, typer.Option(help="CPU quota (cores)")] = None,
    memory_gb: Annotated[float | None, typer.Option(help="Memory quota (GiB)")] = None,
    gpus: Annotated[int | None, typer.Option(help="GPU quota")] = None,
    environment: EnvironmentOpt = None,
    profile: ProfileOpt = None,
) -> None:
    quotas = {"cpu": cpu, "memory_bytes": int(memory_gb * 2**30) if memory_gb else None, "gpus": gpus}
    body = {"name": name, "description": description, "quotas": quotas}
    if environment is not None:
        body["environment"] = environment.value
    p = api(profile).call("POST", "/projects", json=body)
    echo(f"Created project [bold]{p['name']}[/] ({p['id']}, {p['environment']})")


@projects.command("update")
def projects_update(
    project: str,
    description: Annotated[str | None, typer.Option(help="Free text")] = None,
    environment: EnvironmentOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Change a project's description or environment (quotas and limits: the API's PATCH)."""
    body = {
        k: v for k, v in {"description": description, "environment": environment}.items() if v is not None
    }
    if not body:
        raise typer.BadParameter("nothing to change: give --description and/or --environment")
    client = api(profile)
    p = client.call("PATCH", f"/projects/{client.project_id(project)}", json=body)
    echo(f"Updated project [bold]{p['name']}[/] ({p['environment']})")


@projects.command("show")
def projects_show(project: str, profile: ProfileOpt = None) -> None:
    client = api(profile)
    p = client.call("GET", f"/projects/{client.project_id(project)}")
    table([{"field": k, "value": v} for k, v in p.items()], ["field", "value"], title=p["name"])


@projects.command("delete")
def projects_delete(
    project: str,
    yes: YesOpt = False,
    profile: ProfileOpt = None,
) -> None:
    client = api(profile)
    ask = None if yes else f"Delete project {project} and everything in it?"
    client.delete(f"/projects/{client.project_id(project)}", ask=ask)
    echo(f"Deleted project {project}")


@members.command("list")
def members_list(project: str, profile: ProfileOpt = None) -> None:
    client = api(profile)
    rows = list(client.paged(f"/projects/{client.project_id(project)}/members"))
    table(rows, ["id", "subject", "role", "added_by", "created_at"], title="Members")


@members.command("add")
def members_add(project: str, subject: str, role: str = "developer", profile: ProfileOpt = None) -> None:
    client = api(profile)
    m = client.call(
        "POST", f"/projects/{client.project_id(project)}/members", json={"subject": subject, "role": role}
    )
    echo(f"Added {m['subject']} as {m['role']}")


@members.command("remove")
def members_remove(project: str, member_id: str, profile: ProfileOpt = None) -> None:
    client = api(profile)
    client.call("DELETE", f"/projects/{client.project_id(project)}/members/{member_id}")
    echo("Removed")

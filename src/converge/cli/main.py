"""`converge`: start the platform and manage it over its HTTP API."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from converge.cli.client import Api, Profile, current_profile, err, save_profile
from converge.cli.deploy import builds, deploy, deployments
from converge.cli.library import models, policies, sources

app = typer.Typer(help="Converge: a self-hosted AI factory.", no_args_is_help=True)
projects = typer.Typer(help="Projects (tenants).", no_args_is_help=True)
keys = typer.Typer(help="API keys.", no_args_is_help=True)
members = typer.Typer(help="Project members and their roles.", no_args_is_help=True)
app.add_typer(projects, name="projects")
app.add_typer(keys, name="keys")
app.add_typer(members, name="members")
app.add_typer(models, name="models")
app.add_typer(policies, name="policies")
app.add_typer(sources, name="sources")
app.add_typer(deployments, name="deployments")
app.add_typer(builds, name="builds")
app.command("deploy")(deploy)
out = Console()

ProfileOpt = Annotated[str | None, typer.Option("--profile", help="Saved profile to use")]


def api(profile: str | None = None) -> Api:
    return Api(current_profile(profile))


def table(rows: list[dict], columns: list[str], title: str | None = None) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*["" if r.get(c) is None else escape(str(r.get(c))) for c in columns])
    out.print(t)


@app.command()
def up(
    host: Annotated[str | None, typer.Option(help="Bind address (CONVERGE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (CONVERGE_PORT)")] = None,
) -> None:
    """Start Converge: embedded PostgreSQL (unless CONVERGE_DATABASE_URL), migrations, the API."""
    from converge.cli.serve import serve

    serve(host=host, port=port)


@app.command()
def status(profile: ProfileOpt = None) -> None:
    """Readiness of the server and who you are logged in as."""
    client = api(profile)
    resp = client.request("GET", "/readiness")
    ready = resp.json()
    colour = "green" if resp.status_code == 200 else "red"
    out.print(f"[bold]{client.http.base_url}[/]: [{colour}]{ready['status']}[/]")
    table([{"check": k, **v} for k, v in ready["checks"].items()], ["check", "ok", "error"])
    if client.http.headers.get("authorization"):
        me = client.call("GET", "/auth/whoami")
        out.print(f"Logged in as [bold]{me['subject']}[/] ({'admin' if me['is_admin'] else 'member'})")


@app.command()
def login(
    url: Annotated[str, typer.Argument(help="Converge base URL")] = "http://127.0.0.1:8000",
    key: Annotated[
        str | None, typer.Option(help="API key (prompted if omitted)", envvar="CONVERGE_API_KEY")
    ] = None,
    name: Annotated[str, typer.Option("--profile", help="Profile name")] = "default",
) -> None:
    """Check a key against the server and save it as a profile."""
    key = key or typer.prompt("API key", hide_input=True)
    profile = Profile(url=url.rstrip("/"), key=key)
    me = Api(profile).call("GET", "/auth/whoami")
    path = save_profile(name, profile)
    out.print(f"Logged in to {url} as [bold]{me['subject']}[/]; profile '{name}' saved in {path}")


@projects.command("list")
def projects_list(profile: ProfileOpt = None) -> None:
    rows = list(api(profile).paged("/projects"))
    table(rows, ["id", "name", "your_role", "description", "created_at"], title="Projects")


@projects.command("create")
def projects_create(
    name: str,
    description: Annotated[str, typer.Option(help="Free text")] = "",
    cpu: Annotated[float | None, typer.Option(help="CPU quota (cores)")] = None,
    memory_gb: Annotated[float | None, typer.Option(help="Memory quota (GiB)")] = None,
    gpus: Annotated[int | None, typer.Option(help="GPU quota")] = None,
    profile: ProfileOpt = None,
) -> None:
    quotas = {"cpu": cpu, "memory_bytes": int(memory_gb * 2**30) if memory_gb else None, "gpus": gpus}
    body = {"name": name, "description": description, "quotas": quotas}
    p = api(profile).call("POST", "/projects", json=body)
    out.print(f"Created project [bold]{p['name']}[/] ({p['id']})")


@projects.command("show")
def projects_show(project: str, profile: ProfileOpt = None) -> None:
    client = api(profile)
    p = client.call("GET", f"/projects/{client.project_id(project)}")
    table([{"field": k, "value": v} for k, v in p.items()], ["field", "value"], title=p["name"])


@projects.command("delete")
def projects_delete(
    project: str,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask")] = False,
    profile: ProfileOpt = None,
) -> None:
    client = api(profile)
    pid = client.project_id(project)
    if not yes:
        typer.confirm(f"Delete project {project} and everything in it?", abort=True)
    client.call("DELETE", f"/projects/{pid}")
    out.print(f"Deleted project {project}")


@keys.command("list")
def keys_list(
    project: Annotated[
        str | None, typer.Option(help="Project name or id; omit for organisation keys")
    ] = None,
    profile: ProfileOpt = None,
) -> None:
    client = api(profile)
    path = f"/projects/{client.project_id(project)}/keys" if project else "/keys"
    cols = ["id", "name", "prefix", "role", "expires_at", "revoked_at", "last_used_at"]
    table(list(client.paged(path)), cols, title="API keys")


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
    if project:
        body = {"name": name, "role": role or "developer", "expires_in_days": expires_in_days}
        k = client.call("POST", f"/projects/{client.project_id(project)}/keys", json=body)
    else:
        body = {"name": name, "role": role or "admin", "expires_in_days": expires_in_days}
        k = client.call("POST", "/keys", json=body)
    err.print(f"Key [bold]{k['name']}[/] ({k['role']}) created. It is shown only once:")
    print(k["token"])


@keys.command("revoke")
def keys_revoke(
    key_id: str,
    project: Annotated[str | None, typer.Option(help="Project name or id of a project key")] = None,
    profile: ProfileOpt = None,
) -> None:
    client = api(profile)
    path = f"/projects/{client.project_id(project)}/keys/{key_id}" if project else f"/keys/{key_id}"
    k = client.call("DELETE", path)
    out.print(f"Revoked key {k['name']} ({k['prefix']})")


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
    out.print(f"Added {m['subject']} as {m['role']}")


@members.command("remove")
def members_remove(project: str, member_id: str, profile: ProfileOpt = None) -> None:
    client = api(profile)
    client.call("DELETE", f"/projects/{client.project_id(project)}/members/{member_id}")
    out.print("Removed")


if __name__ == "__main__":
    app()

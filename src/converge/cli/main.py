"""`converge`: start the platform and manage it over its HTTP API.

This module wires the command groups, one module each, and holds the few top-level commands.
"""

from __future__ import annotations

from typing import Annotated

import typer

from converge.cli.agents import agents, mcp_servers
from converge.cli.chat import chat
from converge.cli.client import Api, Profile, ProfileOpt, api, save_profile
from converge.cli.cost import cost
from converge.cli.db import db
from converge.cli.deploy import builds, deploy, deployments
from converge.cli.experiments import experiments
from converge.cli.kb import kb
from converge.cli.keys import keys
from converge.cli.logs import logs
from converge.cli.models import models
from converge.cli.output import echo, table
from converge.cli.policies import policies
from converge.cli.projects import members, projects
from converge.cli.rag import rag
from converge.cli.render import render
from converge.cli.rulesets import rulesets
from converge.cli.sources import sources
from converge.kit.roles import ROLE_HELP, Role

app = typer.Typer(help="Converge: a self-hosted AI factory.", no_args_is_help=True)
app.add_typer(projects, name="projects")
app.add_typer(keys, name="keys")
app.add_typer(members, name="members")
app.add_typer(models, name="models")
app.add_typer(policies, name="policies")
app.add_typer(sources, name="sources")
app.add_typer(deployments, name="deployments")
app.add_typer(builds, name="builds")
app.add_typer(kb, name="kb")
app.add_typer(rag, name="rag")
app.add_typer(rulesets, name="rulesets")
app.add_typer(agents, name="agents")
app.add_typer(mcp_servers, name="mcp-servers")
app.add_typer(db, name="db")
app.add_typer(render, name="render")
app.add_typer(cost, name="cost")
app.add_typer(experiments, name="experiments")
app.command("deploy")(deploy)
app.command("chat")(chat)
app.command("logs")(logs)


@app.command()
def up(
    host: Annotated[str | None, typer.Option(help="Bind address (CONVERGE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (CONVERGE_PORT)")] = None,
) -> None:
    """Start Converge: embedded PostgreSQL (unless CONVERGE_DATABASE_URL), migrations, the API."""
    from converge.cli.serve import serve

    serve(host=host, port=port)


SERVE_HELP = (
    "Run some of Converge's roles in this process; `converge up` runs them all. On a cluster each "
    "role is its own Deployment (see `converge render platform`), sharing one PostgreSQL "
    "(CONVERGE_DATABASE_URL, required here) and one artifact store.\n\n"
    + "\n\n".join(f"{role.value}: {ROLE_HELP[role]}." for role in Role)
    + "\n\nEvery role answers /health, /readiness and /metrics, and each can run as several "
    "replicas: the API and the gateway keep no state, one controller leads (a PostgreSQL advisory "
    "lock) while the others stand by, and each build or ingestion job is claimed by one worker. "
    "The api role does not serve /v1 and /v2 unless gateway is also given."
)


@app.command(help=SERVE_HELP)
def serve(
    roles: Annotated[
        list[Role], typer.Argument(help="One or more of api, gateway, controller, worker", show_default=False)
    ],
    host: Annotated[str | None, typer.Option(help="Bind address (CONVERGE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (CONVERGE_PORT)")] = None,
) -> None:
    from converge.cli.serve import serve as run

    run(host=host, port=port, roles=roles)


@app.command()
def status(profile: ProfileOpt = None) -> None:
    """Readiness of the server and who you are logged in as."""
    client = api(profile)
    resp = client.send("GET", "/readiness")
    ready = resp.json()
    colour = "green" if resp.status_code == 200 else "red"
    echo(f"[bold]{client.http.base_url}[/]: [{colour}]{ready['status']}[/]")
    # str(): a check's flag has always read True/False here, where other tables say yes/no.
    rows = [{"check": k, **v, "ok": str(v["ok"])} for k, v in ready["checks"].items()]
    table(rows, ["check", "ok", "error"])
    if client.http.headers.get("authorization"):
        me = client.call("GET", "/auth/whoami")
        echo(f"Logged in as [bold]{me['subject']}[/] ({'admin' if me['is_admin'] else 'member'})")


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
    echo(f"Logged in to {url} as [bold]{me['subject']}[/]; profile '{name}' saved in {path}")


if __name__ == "__main__":
    app()

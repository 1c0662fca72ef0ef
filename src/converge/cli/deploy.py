"""`converge deploy`, `converge deployments ...`, `converge builds ...`."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from converge.cli.client import Api, ProfileOpt, YesOpt, api
from converge.cli.models import get_model, get_version
from converge.cli.output import die, echo, fields, live, table

deployments = typer.Typer(help="Deployments: approved models served by replicas.", no_args_is_help=True)
builds = typer.Typer(
    help="Builds: fetch, smoke-load and benchmark a version for a profile.", no_args_is_help=True
)
ProjectOpt = Annotated[str, typer.Option("--project", "-p", help="Project name or id")]
FINAL_BUILD = {"succeeded", "failed", "cancelled"}


def split_ref(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition(":")
    return name, version or None


def resolve_version(client: Api, ref: str) -> tuple[dict[str, Any], dict[str, Any]]:
    name, version = split_ref(ref)
    model = get_model(client, name)
    if version is None:
        servable = [v for v in model["versions"] if v["state"] in ("approved", "deprecated")]
        if not servable:
            die(f"'{model['name']}' has no approved version")
        return model, servable[-1]
    return model, get_version(model, version)


def find_deployment(client: Api, project_id: str, ref: str) -> dict[str, Any]:
    deployment = client.named("/deployments", ref, params={"project": project_id})
    if deployment is None:
        die(f"No deployment '{ref}' in this project")
    return deployment


def follow_build(client: Api, build: dict[str, Any]) -> dict[str, Any]:
    """Stream the build log until it ends; return the final build."""
    with client.lines(f"/ai-converge/builds/{build['id']}/logs", params={"follow": True}) as lines:
        for line in lines:
            echo(Text(line, style="dim"))
    return client.call("GET", f"/ai-converge/builds/{build['id']}")


def rollout_view(d: dict[str, Any]) -> Group:
    status = d.get("status") or {}
    head = Table.grid(padding=(0, 2))
    head.add_row(
        f"[bold]{d['name']}[/]",
        f"revision {d['revision']}",
        f"phase [bold]{d['phase']}[/]",
        f"ready {status.get('ready_replicas', 0)}/{status.get('target_replicas', d['desired_replicas'])}",
    )
    conds = Table(box=None, show_header=True)
    for col in ("condition", "status", "reason", "message"):
        conds.add_column(col)
    for c in status.get("conditions", []):
        conds.add_row(c["type"], str(c["status"]), c["reason"], c.get("message", ""))
    reps = Table(box=None, show_header=True)
    for col in ("replica", "revision", "phase", "endpoint", "restarts", "in_flight"):
        reps.add_column(col)
    for r in status.get("replicas", []):
        reps.add_row(
            r["id"],
            str(r["revision"]),
            r["phase"],
            r.get("endpoint") or "",
            str(r["restarts"]),
            str(r["in_flight"]),
        )
    return Group(head, conds, reps)


def watch(client: Api, deployment_id: str, *, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    d = client.call("GET", f"/deployments/{deployment_id}")
    with live(rollout_view(d)) as view:
        while time.monotonic() < deadline:
            d = client.call("GET", f"/deployments/{deployment_id}")
            view.update(rollout_view(d))
            current = [r for r in d["status"].get("replicas", []) if r["revision"] == d["revision"]]
            if d["phase"] in ("Ready", "Degraded", "Revoked") and (d["phase"] != "Ready" or current):
                break
            time.sleep(1)
    return d


def deploy(
    model: Annotated[str, typer.Argument(help="MODEL or MODEL:VERSION (name or id)")],
    project: ProjectOpt = "default",
    name: Annotated[str | None, typer.Option(help="Deployment name (default: the model name)")] = None,
    replicas_min: Annotated[int, typer.Option(help="Minimum replicas")] = 1,
    replicas_max: Annotated[int, typer.Option(help="Maximum replicas")] = 1,
    cpu: Annotated[float, typer.Option(help="CPU cores per replica")] = 1.0,
    memory_gb: Annotated[float, typer.Option(help="Memory per replica (GiB)")] = 2.0,
    gpus: Annotated[int, typer.Option(help="GPUs per replica")] = 0,
    build_profile: Annotated[str, typer.Option("--build-profile", help="Build profile")] = "cpu",
    server: Annotated[
        str | None, typer.Option(help="llama-cpp | embeddings | v2 (default: from the format)")
    ] = None,
    build: Annotated[bool, typer.Option(help="Build first when there is no successful build")] = True,
    wait: Annotated[bool, typer.Option(help="Show the rollout until it is ready")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the rollout")] = 300,
    profile: ProfileOpt = None,
) -> None:
    """Deploy an approved model version: build it if needed, then roll it out live."""
    client = api(profile)
    pid = client.project_id(project)
    model_obj, version = resolve_version(client, model)
    if build:
        done = [
            b
            for b in client.paged("/ai-converge/builds/succeeded")
            if b["model_version_id"] == version["id"] and b["profile"] == build_profile
        ]
        if not done:
            echo(f"Building {model_obj['name']}:{version['version']} for profile '{build_profile}'...")
            b = client.call(
                "POST",
                "/ai-converge/build",
                json={"project_id": pid, "model_version_id": version["id"], "profile": build_profile},
            )
            b = follow_build(client, b)
            if b["state"] != "succeeded":
                die(Text.assemble((f"Build {b['state']}:", "red"), " ", str(b["reason"])))
    body = {
        "name": name or model_obj["name"].replace(".", "-").replace("_", "-")[:63],
        "model_version_id": version["id"],
        "profile": build_profile,
        "resources": {"cpu": cpu, "memory_bytes": int(memory_gb * 2**30), "gpus": gpus},
        "replicas": {"min": replicas_min, "max": replicas_max},
        **({"server": server} if server else {}),
    }
    d = client.call("POST", "/deployments", params={"project": pid}, json=body)
    echo(f"Deployment [bold]{d['name']}[/] ({d['id']}) created at revision {d['revision']}")
    if wait:
        d = watch(client, d["id"], timeout=timeout)
        colour = "green" if d["phase"] == "Ready" else "red"
        echo(f"[{colour}]{d['name']}: {d['phase']}[/]")
        if d["phase"] != "Ready":
            raise typer.Exit(1)


@deployments.command("list")
def deployments_list(
    project: Annotated[str | None, typer.Option("--project", "-p")] = None, profile: ProfileOpt = None
) -> None:
    client = api(profile)
    params = {"project": client.project_id(project)} if project else {}
    rows = []
    for d in client.paged("/deployments", params=params):
        st = d.get("status") or {}
        rows.append(
            {
                **d,
                "model": f"{d['spec'].get('model_name')}:{d['spec'].get('version')}",
                "ready": f"{st.get('ready_replicas', 0)}/{st.get('target_replicas', d['desired_replicas'])}",
            }
        )
    table(rows, ["name", "model", "revision", "phase", "ready", "project_id"], title="Deployments")


@deployments.command("show")
def deployments_show(deployment: str, project: ProjectOpt = "default", profile: ProfileOpt = None) -> None:
    client = api(profile)
    d = find_deployment(client, client.project_id(project), deployment)
    echo(rollout_view(d))
    fields([(k, v) for k, v in d["spec"].items()], title="Spec")


@deployments.command("logs")
def deployments_logs(
    deployment: str,
    project: ProjectOpt = "default",
    replica: Annotated[str | None, typer.Option(help="Replica id")] = None,
    tail: Annotated[int, typer.Option(help="Lines from the end")] = 100,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming")] = False,
    profile: ProfileOpt = None,
) -> None:
    client = api(profile)
    d = find_deployment(client, client.project_id(project), deployment)
    params: dict[str, Any] = {"tail": tail, "follow": follow, **({"replica": replica} if replica else {})}
    with client.lines(f"/deployments/{d['id']}/logs", params=params) as lines:
        for line in lines:
            print(line)


@deployments.command("redeploy")
def deployments_redeploy(
    deployment: str, project: ProjectOpt = "default", profile: ProfileOpt = None
) -> None:
    """Restart every replica of the current revision, one at a time."""
    client = api(profile)
    d = find_deployment(client, client.project_id(project), deployment)
    d = client.call("POST", f"/deployments/{d['id']}/redeploy")
    echo(f"Redeploying {d['name']} (generation {d['restart_generation']})")


@deployments.command("rollback")
def deployments_rollback(
    deployment: str,
    revision: Annotated[int, typer.Option(help="Revision to go back to")],
    project: ProjectOpt = "default",
    profile: ProfileOpt = None,
) -> None:
    client = api(profile)
    d = find_deployment(client, client.project_id(project), deployment)
    d = client.call("POST", f"/deployments/{d['id']}/rollback", json={"revision": revision})
    echo(f"{d['name']}: revision {d['revision']} (the spec of revision {revision}) is rolling out")


@deployments.command("delete")
def deployments_delete(
    deployment: str,
    project: ProjectOpt = "default",
    yes: YesOpt = False,
    profile: ProfileOpt = None,
) -> None:
    client = api(profile)
    d = find_deployment(client, client.project_id(project), deployment)
    client.delete(f"/deployments/{d['id']}", ask=None if yes else f"Stop and delete {d['name']}?")
    echo(f"Deleting {d['name']}")


@builds.command("create")
def builds_create(
    model: Annotated[str, typer.Argument(help="MODEL or MODEL:VERSION")],
    project: ProjectOpt = "default",
    build_profile: Annotated[str, typer.Option("--build-profile")] = "cpu",
    follow: Annotated[bool, typer.Option(help="Stream the log until the build ends")] = True,
    profile: ProfileOpt = None,
) -> None:
    client = api(profile)
    _, version = resolve_version(client, model)
    b = client.call(
        "POST",
        "/ai-converge/build",
        json={
            "project_id": client.project_id(project),
            "model_version_id": version["id"],
            "profile": build_profile,
        },
    )
    echo(f"Build {b['id']} queued")
    if follow:
        b = follow_build(client, b)
        echo(f"Build {b['state']} {b['reason']}")
        if b["results"]:
            fields(list(b["results"].items()), title="Benchmark")


@builds.command("list")
def builds_list(
    state: Annotated[str | None, typer.Option(help="queued|running|succeeded|failed|cancelled")] = None,
    profile: ProfileOpt = None,
) -> None:
    client = api(profile)
    path = f"/ai-converge/builds/{state}" if state else "/ai-converge/builds"
    table(
        list(client.paged(path)),
        ["id", "state", "profile", "server", "model_version_id", "created_at"],
        title="Builds",
    )


@builds.command("show")
def builds_show(build_id: str, profile: ProfileOpt = None) -> None:
    b = api(profile).call("GET", f"/ai-converge/builds/{build_id}")
    fields([(k, v) for k, v in b.items() if k != "results"], title=f"Build {build_id}")
    if b["results"]:
        fields(list(b["results"].items()), title="Benchmark")


@builds.command("logs")
def builds_logs(
    build_id: str, follow: Annotated[bool, typer.Option("--follow", "-f")] = False, profile: ProfileOpt = None
) -> None:
    client = api(profile)
    with client.lines(f"/ai-converge/builds/{build_id}/logs", params={"follow": follow}) as lines:
        for line in lines:
            print(line)


@builds.command("cancel")
def builds_cancel(build_id: str, profile: ProfileOpt = None) -> None:
    b = api(profile).call("POST", f"/ai-converge/builds/{build_id}/cancel")
    echo(f"Build {b['id']}: {b['state']}")

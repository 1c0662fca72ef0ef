"""`converge sources ...`: registries (OCI, S3) whose new tags/objects become model versions."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.text import Text

from converge.cli.client import SLOW, Api, ProfileOpt, YesOpt, api
from converge.cli.output import busy, die, echo, fields, table, when, yes_no

sources = typer.Typer(
    help="Registry sources (OCI, S3) whose new tags/objects become model versions.", no_args_is_help=True
)
SourceArg = Annotated[str, typer.Argument(help="Source name or id")]


class Kind(StrEnum):
    oci = "oci"
    s3 = "s3"
    mlflow = "mlflow"


def get_source(client: Api, ref: str) -> dict[str, Any]:
    source = client.lookup("/sources", ref)
    if source is None:
        die(f"No source named '{ref}'; `converge sources list` shows them")
    return source


def show_source(source: dict[str, Any]) -> None:
    options = {k: v for k, v in (source.get("options") or {}).items() if v is not None}
    error = Text(source["last_error"], style="red") if source.get("last_error") else None
    fields(
        [
            ("name", Text(source["name"], style="bold")),
            ("id", source["id"]),
            ("kind", source["kind"]),
            ("uri", source["uri"]),
            ("model", source["model_name"]),
            ("interval", f"{source['interval_s']:g}s"),
            ("enabled", yes_no(source["enabled"])),
            ("options", ", ".join(f"{k}={v}" for k, v in options.items()) or None),
            ("last sync", when(source.get("last_sync_at")) or "never"),
            ("last error", error or ("none" if source.get("last_sync_at") else None)),
            (
                "next run",
                when(source.get("next_run_at")) if source["enabled"] else "not scheduled (disabled)",
            ),
            ("created by", source.get("created_by")),
        ]
    )


@sources.command("list")
def sources_list(profile: ProfileOpt = None) -> None:
    """Registry sources and how their last sync went."""
    rows = []
    for s in api(profile).paged("/sources", params={"limit": 500}):
        rows.append(
            {
                **s,
                "interval": f"{s['interval_s']:g}s",
                "enabled": yes_no(s["enabled"]),
                "last sync": when(s.get("last_sync_at")) or "never",
                "last error": Text(s["last_error"] or "", style="red"),
                "next run": when(s.get("next_run_at")) if s["enabled"] else "disabled",
            }
        )
    if not rows:
        echo("No sources yet: an admin adds one with `converge sources add`")
        return
    columns = ["name", "kind", "uri", "model_name", "interval", "enabled", "last sync", "last error"]
    table(rows, [*columns, "next run"], title="Sources")


@sources.command("add")
def sources_add(
    name: Annotated[str, typer.Option("--name", help="Lowercase source name")],
    uri: Annotated[
        str, typer.Option(help="oci://registry/repository, s3://bucket/prefix or mlflow://models/NAME")
    ],
    model: Annotated[str, typer.Option("--model", help="Library model that new items become versions of")],
    kind: Annotated[Kind | None, typer.Option(help="oci, s3 or mlflow; default: the URI's scheme")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between syncs (1-86400)")] = 60.0,
    endpoint: Annotated[str | None, typer.Option(help="S3 endpoint URL (MinIO, ...)")] = None,
    region: Annotated[str | None, typer.Option(help="S3 region")] = None,
    access_key_id: Annotated[str | None, typer.Option(help="S3 access key id")] = None,
    secret_access_key: Annotated[
        str | None, typer.Option(help="S3 secret key (stored on the server, never shown again)")
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking server of an mlflow:// source (http://host:5000)")
    ] = None,
    insecure: Annotated[
        bool | None, typer.Option("--insecure/--secure", help="Plain HTTP to the OCI registry")
    ] = None,
    enabled: Annotated[
        bool, typer.Option("--enable/--disable", help="Sync on schedule from now, or not yet")
    ] = True,
    profile: ProfileOpt = None,
) -> None:
    """Register a source (admins). Artifacts from a registered source count as known to policies."""
    if kind is None:
        scheme = uri.partition("://")[0]
        if scheme not in ("oci", "s3", "mlflow"):
            die(f"Cannot tell the kind from '{uri}': it must start with oci://, s3:// or mlflow://")
        kind = Kind(scheme)
    options = {
        "endpoint": endpoint,
        "region": region,
        "access_key_id": access_key_id,
        "secret_access_key": secret_access_key,
        "insecure": insecure,
        "tracking_uri": tracking_uri,
    }
    body = {
        "name": name,
        "kind": kind.value,
        "uri": uri,
        "model_name": model,
        "interval_s": interval,
        "enabled": enabled,
        "options": {k: v for k, v in options.items() if v is not None},
    }
    source = api(profile).call("POST", "/sources", json=body)
    echo(f"Added source [bold]{escape(source['name'])}[/] ({source['id']})")
    show_source(source)


@sources.command("show")
def sources_show(name: SourceArg, profile: ProfileOpt = None) -> None:
    """One source: settings, last sync, last error, next run."""
    show_source(get_source(api(profile), name))


@sources.command("update")
def sources_update(
    name: SourceArg,
    interval: Annotated[float | None, typer.Option(help="Seconds between syncs (1-86400)")] = None,
    enabled: Annotated[
        bool | None, typer.Option("--enable/--disable", help="Switch syncing on or off")
    ] = None,
    profile: ProfileOpt = None,
) -> None:
    """Change a source's interval or switch it on or off."""
    body = {k: v for k, v in {"interval_s": interval, "enabled": enabled}.items() if v is not None}
    if not body:
        die("Nothing to change: pass --interval, --enable or --disable")
    client = api(profile)
    source = get_source(client, name)
    show_source(client.call("PATCH", f"/sources/{source['id']}", json=body))


@sources.command("sync")
def sources_sync(name: SourceArg, profile: ProfileOpt = None) -> None:
    """Sync now instead of waiting for the next run. Exits 1 if the sync failed."""
    client = api(profile)
    source = get_source(client, name)
    with busy(f"Syncing {escape(source['name'])}..."):
        result = client.call("POST", f"/sources/{source['id']}/sync", timeout=SLOW)
    synced = result["source"]
    new = result["new_versions"]
    if synced.get("last_error"):
        show_source(synced)
        die(f"Sync of {synced['name']} failed: {synced['last_error']}")
    if new:
        model = escape(synced["model_name"])
        echo(f"{len(new)} new version(s) of [bold]{model}[/]: {escape(', '.join(new))}")
        echo(f"See them with `converge models show {model}`")
    else:
        echo(f"Synced {escape(synced['name'])}: nothing new")


@sources.command("delete")
def sources_delete(name: SourceArg, yes: YesOpt = False, profile: ProfileOpt = None) -> None:
    """Delete a source. Versions it registered stay; new ones from its URI count as unknown."""
    client = api(profile)
    source = get_source(client, name)
    client.delete(f"/sources/{source['id']}", ask=None if yes else f"Delete source {source['name']}?")
    echo(f"Deleted source {escape(source['name'])}")

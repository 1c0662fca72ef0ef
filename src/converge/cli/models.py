"""`converge models ...`: register model versions, inspect them, approve, revoke."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.markup import escape
from rich.text import Text

from converge.cli.client import SLOW, Api, ProfileOpt, api, fail, is_uuid
from converge.cli.model_views import (
    next_steps,
    show_approvals,
    show_model,
    show_revocation_plan,
    show_version,
    show_versions,
    styled_state,
    versions_summary,
)
from converge.cli.output import busy, die, echo, note, table, transfer

models = typer.Typer(
    help="Model Library: register model versions, inspect them, approve, revoke.", no_args_is_help=True
)

CHUNK = 1 << 20  # 1 MiB: upload and hashing read size
VERSION_HELP = "Version name (e.g. v1) or id"
ModelArg = Annotated[str, typer.Argument(help="Model name or id")]
VersionArg = Annotated[str, typer.Argument(help=VERSION_HELP)]


class State(StrEnum):
    registered = "registered"
    scanning = "scanning"
    pending_approval = "pending_approval"
    approved = "approved"
    rejected = "rejected"
    deprecated = "deprecated"
    revoked = "revoked"


# ---------------------------------------------------------------------------------------------
# Lookup (deploy.py resolves MODEL:VERSION with these too)


def find_model(client: Api, ref: str) -> dict[str, Any] | None:
    """The model (with its versions) named or identified by `ref`, or None."""
    if is_uuid(ref):
        resp = client.send("GET", f"/models/{ref}")
        if resp.status_code == 404:
            return None
        if resp.status_code >= 400:
            fail(resp)
        return resp.json()
    # ?name= is a substring filter: page through the matches for the exact name.
    model = client.named("/models", ref, params={"name": ref})
    return None if model is None else client.call("GET", f"/models/{model['id']}")


def get_model(client: Api, ref: str) -> dict[str, Any]:
    model = find_model(client, ref)
    if model is None:
        die(f"No model named '{ref}' is visible to you; `converge models list` shows the ones that are")
    return model


def get_version(model: dict[str, Any], ref: str) -> dict[str, Any]:
    for version in model["versions"]:
        if version["version"] == ref or version["id"] == ref:
            return version
    known = ", ".join(v["version"] for v in model["versions"]) or "none yet"
    die(f"Model '{model['name']}' has no version '{ref}' (versions: {known})")


def next_version_name(versions: list[dict[str, Any]]) -> str:
    """v<N+1>: N is the highest vN in use, or the number of versions if that is higher."""
    taken = {v["version"] for v in versions}
    numbers = [int(m[1]) for v in taken if (m := re.fullmatch(r"v(\d+)", v))]
    n = max([len(versions), *numbers]) + 1
    while f"v{n}" in taken:
        n += 1
    return f"v{n}"


# ---------------------------------------------------------------------------------------------
# Adding a version


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with transfer() as progress:
        task = progress.add_task("hashing  ", total=path.stat().st_size)
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
                progress.advance(task, len(chunk))
    return digest.hexdigest()


def upload(
    client: Api, model: dict[str, Any], path: Path, *, version: str, sha256: str | None
) -> dict[str, Any]:
    size = path.stat().st_size
    params = {"version": version, "filename": path.name}
    if sha256:
        params["sha256"] = sha256
    with transfer() as progress:
        task = progress.add_task("uploading", total=size)

        def body() -> Iterator[bytes]:
            with path.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk
                    progress.advance(task, len(chunk))
            progress.update(task, description="checking ")  # the server now scans and inspects

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        try:
            resp = client.request(
                "POST",
                f"/models/{model['id']}/versions/upload",
                params=params,
                content=body(),
                headers=headers,
                timeout=SLOW,
            )
        except httpx.TimeoutException:
            die("The server did not answer in time; `converge models show` tells whether it registered")
        except httpx.HTTPError as exc:
            die(f"Upload failed: {exc}; nothing was registered by this command")
        if resp.status_code < 400:
            progress.update(task, description="uploaded ")
    if resp.status_code >= 400:
        fail(resp)
    return resp.json()


def _normalise_digest(value: str) -> str:
    digest = value.strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        die(f"--sha256 must be 64 hex digits (optionally prefixed 'sha256:'), got '{value}'")
    return digest


def _artifact(artifact: str, *, name: str) -> tuple[str | None, Path | None]:
    """(uri, None) for something the server fetches, (None, path) for a local file to upload."""
    if artifact.startswith(("s3://", "oci://")):
        return artifact, None
    if artifact.startswith("server:"):
        uri = artifact.removeprefix("server:")
        if not uri.startswith("/"):
            die(f"A server path must be absolute, e.g. server:/data/models/x.gguf (got '{artifact}')")
        return uri, None
    local = Path(artifact).expanduser()
    if local.is_dir():
        die(
            f"{artifact} is a directory. Uploads take one file. Register a folder by its path on the "
            f"server (`converge models add server:/abs/path/{local.name} --name {name}`, admins only), "
            "or push it to an OCI registry or S3 and add it by URI (oci://... or s3://...)"
        )
    if not local.is_file():
        hint = "; for a path on the server write server:/abs/path" if artifact.startswith("/") else ""
        die(f"No such file: {artifact}{hint}")
    return None, local


def _model_for_add(client: Api, name: str, *, description: str, tags: list[str]) -> dict[str, Any]:
    """The model to add a version to, created if it does not exist yet."""
    model = find_model(client, name)
    if model is not None:
        if description or tags:
            note("The model exists already: --description and --tag only apply when it is created")
        return model
    resp = client.send("POST", "/models", json={"name": name, "description": description, "tags": tags})
    if resp.status_code == 409:  # created meanwhile by someone else
        return get_model(client, name)
    if resp.status_code >= 400:
        fail(resp)
    note(f"Created model [bold]{escape(resp.json()['name'])}[/]")
    return {**resp.json(), "versions": []}


ADD_HELP = (
    "Register a model version from a local file or a URI, then show what the library found.\n\n"
    "The server scans the artifact, reads its facts (format, architecture, parameters, ...) and runs "
    "the registration policies; the command exits 1 if they reject the version.\n\n"
    "A local file is streamed with a progress bar. A directory is not uploaded: register it by its "
    "server path (server:/abs/dir, admins only), or push it to an OCI registry or S3 and add it by URI."
)


@models.command("add", help=ADD_HELP)
def models_add(
    artifact: Annotated[
        str,
        typer.Argument(
            help="A local file to upload, or a URI: s3://bucket/key, oci://registry/repo:tag, "
            "or server:/absolute/path (a path on the server; admins only)",
            metavar="PATH|URI",
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="Model name; created if it does not exist")],
    version: Annotated[str | None, typer.Option("--version", help="Version name; default v<N+1>")] = None,
    description: Annotated[str, typer.Option(help="Model description (used when the model is created)")] = "",
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Model tag, repeatable (used when the model is created)")
    ] = None,
    sha256: Annotated[
        str | None,
        typer.Option(help="Expected sha256 of the artifact: the server refuses bytes that differ"),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Hash the local file first and have the server check the upload against it"
        ),
    ] = False,
    profile: ProfileOpt = None,
) -> None:
    """Register a model version from a local file or a URI (see ADD_HELP)."""
    digest = _normalise_digest(sha256) if sha256 else None
    uri, local = _artifact(artifact, name=name)
    if verify and local is None:
        die("--verify hashes a local file; for a URI pass the expected digest with --sha256")

    client = api(profile)
    model = _model_for_add(client, name, description=description, tags=tag or [])
    version = version or next_version_name(model["versions"])
    if any(v["version"] == version for v in model["versions"]):
        die(f"Model '{model['name']}' already has a version '{version}'; pick another with --version")

    if local is not None:
        if verify:
            actual = sha256_of(local)
            if digest and actual != digest:
                die(f"{local} hashes to sha256 {actual}, not the {digest} you declared; nothing was sent")
            digest = actual
        created = upload(client, model, local, version=version, sha256=digest)
    else:
        with busy(f"Fetching {escape(str(uri))} on the server, then scanning..."):
            created = client.call(
                "POST",
                f"/models/{model['id']}/versions",
                json={"version": version, "uri": uri, "sha256": digest},
                timeout=SLOW,
            )
    echo(f"Registered [bold]{escape(model['name'])} {escape(created['version'])}[/]")
    show_version(model, created)
    next_steps(model, created)
    if created["state"] == "rejected":
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------
# Reading the library


@models.command("list")
def models_list(
    name: Annotated[str | None, typer.Option(help="Substring of the model name")] = None,
    tag: Annotated[str | None, typer.Option(help="Only models carrying this tag")] = None,
    format: Annotated[
        str | None, typer.Option("--format", help="Only models with a version of this format, e.g. gguf")
    ] = None,
    state: Annotated[State | None, typer.Option(help="Only models with a version in this state")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many models")] = 50,
    profile: ProfileOpt = None,
) -> None:
    """Models in the library, with their newest versions and states."""
    client = api(profile)
    params: dict[str, object] = {
        "name": name,
        "tag": tag,
        "format": format,
        "state": state.value if state else None,
    }
    params = {k: v for k, v in params.items() if v is not None} | {"limit": min(limit, 500)}
    rows = []
    for m in client.paged("/models", params=params, limit=limit):
        detail = client.call("GET", f"/models/{m['id']}")
        rows.append({**m, "versions": versions_summary(detail["versions"])})
    if not rows:
        echo(
            "No models match"
            if len(params) > 1
            else "The library is empty: add one with `converge models add`"
        )
        return
    table(rows, ["name", "versions", "tags", "visibility", "created_by", "id"], title="Models")


@models.command("show")
def models_show(
    name: ModelArg,
    version: Annotated[str | None, typer.Argument(help=VERSION_HELP + "; omit for all versions")] = None,
    profile: ProfileOpt = None,
) -> None:
    """A model and its versions, or one version: facts, scan findings, decision, approvals."""
    client = api(profile)
    model = get_model(client, name)
    if version is not None:
        chosen = get_version(model, version)
        show_version(model, chosen)
        show_approvals(chosen)
        next_steps(model, chosen)
        return
    show_model(model)
    if not model["versions"]:
        echo("No versions yet: add one with `converge models add PATH --name " + model["name"] + "`")
        return
    show_versions(model["versions"])


# ---------------------------------------------------------------------------------------------
# Governing versions


def _verdict(action: str, name: str, version: str, note_text: str, profile: str | None) -> None:
    client = api(profile)
    model = get_model(client, name)
    chosen = get_version(model, version)
    path = f"/models/{model['id']}/versions/{chosen['id']}/{action}"
    updated = client.call("POST", path, json={"note": note_text})
    line = Text(f"{model['name']} {updated['version']}: ").append(styled_state(updated["state"]))
    echo(line)
    if action == "approve" and updated["state"] == "pending_approval":
        count = sum(a["verdict"] == "approve" for a in updated.get("approvals") or [])
        echo(f"Your approval is recorded ({count} so far); the version still needs more approvals.")


@models.command("approve")
def models_approve(
    name: ModelArg,
    version: VersionArg,
    note_text: Annotated[str, typer.Option("--note", help="Why you approve")] = "",
    profile: ProfileOpt = None,
) -> None:
    """Approve a version pending approval (needs library:approve: a library approver or an admin;
    never your own submission)."""
    _verdict("approve", name, version, note_text, profile)


@models.command("reject")
def models_reject(
    name: ModelArg,
    version: VersionArg,
    note_text: Annotated[str, typer.Option("--note", help="Why: shown to the submitter")],
    profile: ProfileOpt = None,
) -> None:
    """Reject a version (a library approver, or the submitting project while only it deploys the
    model). Rejection is final."""
    _verdict("reject", name, version, note_text, profile)


@models.command("revoke")
def models_revoke(
    name: ModelArg,
    version: VersionArg,
    reason: Annotated[
        str | None,
        typer.Option(
            "--reason", "--note", help="Why (required): recorded in the audit log, sent to affected projects"
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Show the deployments, per project, that would stop; change nothing"),
    ] = False,
    profile: ProfileOpt = None,
) -> None:
    """Revoke a version: every deployment of it, in any project, is stopped. Final.

    Needs library:govern (a library approver or an admin), or the submitting project while no other
    project deploys the model. Try it with --dry-run first."""
    if not dry_run and not (reason or "").strip():
        die("A revocation needs --reason: it is final, and the reason goes to every project it affects")
    client = api(profile)
    model = get_model(client, name)
    chosen = get_version(model, version)
    path = f"/models/{model['id']}/versions/{chosen['id']}/revoke"
    if dry_run:
        plan = client.call("POST", path, params={"dry_run": "true"}, json={"reason": reason or ""})
        show_revocation_plan(model, plan)
        return
    updated = client.call("POST", path, json={"reason": reason})
    echo(Text(f"{model['name']} {updated['version']}: ").append(styled_state(updated["state"])))


@models.command("deprecate")
def models_deprecate(
    name: ModelArg,
    version: VersionArg,
    note_text: Annotated[str, typer.Option("--note", help="Why, e.g. what replaces it")] = "",
    profile: ProfileOpt = None,
) -> None:
    """Deprecate an approved version (needs library:govern, like revoke): still deployable, flagged as old."""
    _verdict("deprecate", name, version, note_text, profile)

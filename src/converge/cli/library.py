"""`converge models | policies | sources`: the Model Library over the HTTP API.

Like the rest of the CLI this module only speaks HTTP: it never imports the control path.
Server-provided text is rendered with `Text`/`escape`, so a `[` in an expression, a file name
or an error message is shown as written instead of being read as rich markup.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.filesize import decimal as human_bytes
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from converge.cli import client as cli_client
from converge.cli.client import Api, current_profile

out = Console()

models = typer.Typer(
    help="Model Library: register model versions, inspect them, approve, revoke.", no_args_is_help=True
)
policies = typer.Typer(
    help="Policies: CEL rules that decide registration, approval and deployment.", no_args_is_help=True
)
sources = typer.Typer(
    help="Registry sources (OCI, S3) whose new tags/objects become model versions.", no_args_is_help=True
)

ProfileOpt = Annotated[str | None, typer.Option("--profile", help="Saved profile to use")]
CHUNK = 1 << 20  # 1 MiB: upload and hashing read size
# Uploads and URI registrations do all their work (store, scan, inspect) before answering.
SLOW = httpx.Timeout(30.0, read=1800.0)
NAME_HELP = "Model name or id"
VERSION_HELP = "Version name (e.g. v1) or id"


class State(StrEnum):
    registered = "registered"
    scanning = "scanning"
    pending_approval = "pending_approval"
    approved = "approved"
    rejected = "rejected"
    deprecated = "deprecated"
    revoked = "revoked"


class Effect(StrEnum):
    deny = "deny"
    warn = "warn"
    approve = "approve"


class Scope(StrEnum):
    registration = "registration"
    approval = "approval"
    deployment = "deployment"


class Kind(StrEnum):
    oci = "oci"
    s3 = "s3"


STATE_STYLE = {
    "approved": "green",
    "pending_approval": "yellow",
    "rejected": "red",
    "revoked": "red",
    "deprecated": "magenta",
}


# ---------------------------------------------------------------------------------------------
# Plumbing


def api(profile: str | None) -> Api:
    return Api(current_profile(profile))


def die(message: str, code: int = 1) -> NoReturn:
    # cli_client.err looked up at call time: one console for every error, replaceable in tests.
    cli_client.err.print(f"[red]{message}[/]")
    raise typer.Exit(code)


def note(message: str) -> None:
    cli_client.err.print(message)


def cell(value: Any) -> Text:
    if value is None:
        return Text("")
    if isinstance(value, bool):
        return Text("yes" if value else "no")
    if isinstance(value, list | tuple):
        return Text(", ".join(str(v) for v in value))
    return Text(str(value))


def table(rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[r[c] if isinstance(r.get(c), Text) else cell(r.get(c)) for c in columns])
    out.print(t)


def fields(rows: list[tuple[str, Any]], title: str | None = None) -> None:
    """A two-column key/value table; rows whose value is None are left out."""
    t = Table(title=title, show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for key, value in rows:
        if value is not None:
            t.add_row(key, value if isinstance(value, Text) else cell(value))
    out.print(t)


def styled_state(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def human_count(n: int | None) -> str | None:
    """134515008 -> '134.5M'."""
    if n is None:
        return None
    for size, unit in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def when(iso: str | None) -> str | None:
    """'2025-01-02 10:00:00 UTC (3m ago)' from an ISO 8601 timestamp."""
    if not iso:
        return None
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = (moment - datetime.now(UTC)).total_seconds()
    span = abs(delta)
    if span < 60:
        rel = f"{int(span)}s"
    elif span < 3600:
        rel = f"{int(span // 60)}m"
    elif span < 86400:
        rel = f"{span / 3600:.1f}h"
    else:
        rel = f"{span / 86400:.1f}d"
    stamp = moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} ({'in ' + rel if delta > 0 else rel + ' ago'})"


def is_uuid(ref: str) -> bool:
    try:
        uuid.UUID(ref)
    except ValueError:
        return False
    return True


def fail(resp: httpx.Response) -> NoReturn:
    """cli.client.fail, but the server's words are shown literally.

    client.fail prints the detail as rich markup, so a pattern such as `[a-z0-9]` in a
    validation message vanishes; this escapes it and otherwise reads the same.
    """
    try:
        body = resp.json()
        detail = body.get("detail") or body.get("error", {}).get("message") or resp.text
    except (ValueError, AttributeError):
        detail = resp.text
    cli_client.err.print(f"[red]Error {resp.status_code}:[/] {escape(str(detail))}")
    raise typer.Exit(1)


def send(client: Api, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """Api.request (which exits 2 when the server is unreachable), for other transport failures too."""
    try:
        return client.request(method, path, **kwargs)
    except httpx.TimeoutException:
        die(f"The server did not answer {method} {path} in time")
    except httpx.HTTPError as exc:
        die(f"Request {method} {path} failed: {exc}")


def call_json(client: Api, method: str, path: str, **kwargs: Any) -> Any:
    """Api.call with literal error text and a readable message for any transport failure."""
    resp = send(client, method, path, **kwargs)
    if resp.status_code >= 400:
        fail(resp)
    return resp.json() if resp.status_code != 204 and resp.content else None


def pages(
    client: Api, path: str, params: dict[str, Any] | None = None, limit: int | None = None
) -> Iterator[Any]:
    """Api.paged on top of call_json."""
    params = dict(params or {})
    seen = 0
    while True:
        page = call_json(client, "GET", path, params=params)
        for item in page["items"]:
            yield item
            seen += 1
            if limit is not None and seen >= limit:
                return
        if not page.get("next_cursor"):
            return
        params["cursor"] = page["next_cursor"]


def paged(client: Api, path: str, params: dict[str, Any] | None = None, limit: int | None = None) -> list:
    return list(pages(client, path, params, limit))


# ---------------------------------------------------------------------------------------------
# Models: lookup


def find_model(client: Api, ref: str) -> dict[str, Any] | None:
    """The model (with its versions) named or identified by `ref`, or None."""
    if is_uuid(ref):
        resp = send(client, "GET", f"/models/{ref}")
        if resp.status_code == 404:
            return None
        if resp.status_code >= 400:
            fail(resp)
        return resp.json()
    # ?name= is a substring filter: page through the matches for the exact name.
    for model in pages(client, "/models", {"name": ref, "limit": 500}):
        if model["name"] == ref:
            return call_json(client, "GET", f"/models/{model['id']}")
    return None


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
# Models: rendering


def outcome_label(outcome: dict[str, Any]) -> Text:
    result, effect = outcome.get("outcome"), outcome.get("effect")
    if result == "pass":
        return Text("pass", style="green")
    if effect == "warn":
        return Text("warn", style="yellow")
    if effect == "approve":  # not passing only means "no automatic approval"
        return Text("fail" if result == "fail" else "error", style="dim")
    return Text("fail" if result == "fail" else "error", style="bold red")


def show_decision(decision: dict[str, Any], title: str = "Policy decision") -> None:
    if not decision:
        out.print(f"{title}: none recorded")
        return
    verdict = Text("allowed", style="green") if decision.get("allowed") else Text("denied", style="bold red")
    line = Text(f"{title} ({decision.get('scope', '?')}): ").append(verdict)
    if decision.get("approve"):
        line.append(", approved by policy", style="green")
    out.print(line)
    outcomes = decision.get("outcomes") or []
    if not outcomes:
        out.print("  no rules of this scope are enabled")
        return
    rows = [
        {
            "result": outcome_label(o),
            "rule": o.get("rule"),
            "effect": o.get("effect"),
            "message": o.get("message") or "",
        }
        for o in outcomes
    ]
    table(rows, ["result", "rule", "effect", "message"])


def show_scan(scan: dict[str, Any]) -> None:
    status = scan.get("status") or "not scanned"
    style = {"clean": "green", "unsafe": "bold red", "error": "red"}.get(status, "")
    scanner = " ".join(str(s) for s in (scan.get("scanner"), scan.get("scanner_version")) if s)
    line = Text("Scan: ").append(status, style=style)
    if scanner:
        line.append(f" ({scanner})")
    out.print(line)
    findings = scan.get("findings") or []
    if findings:
        table(findings, ["severity", "file", "global", "message"], title="Scan findings")


def facts_rows(version: dict[str, Any]) -> list[tuple[str, Any]]:
    insp = version.get("inspection") or {}

    def known(value: Any) -> Any:
        return Text("unknown", style="dim") if value in (None, "") else value

    context = insp.get("context_length")
    kv = insp.get("kv_cache_bytes_per_1k_tokens")
    return [
        ("format", version.get("format") or insp.get("format")),
        ("architecture", known(insp.get("architecture"))),
        ("parameters", known(human_count(insp.get("parameter_count")))),
        ("quantization", known(insp.get("quantization"))),
        ("context length", known(f"{context:,} tokens" if context else None)),
        ("license", known(insp.get("license"))),
        ("chat template", "yes" if insp.get("has_chat_template") else None),
        ("dtypes", ", ".join(insp["dtypes"]) if insp.get("dtypes") else None),
        ("memory", human_bytes(insp["memory_bytes"]) if insp.get("memory_bytes") else None),
        ("KV cache / 1k tokens", human_bytes(kv) if kv else None),
        ("inspection error", insp.get("error")),
    ]


def show_version(model: dict[str, Any], version: dict[str, Any]) -> None:
    source = version.get("source") or {}
    origin = source.get("uri") or source.get("kind")
    if source.get("name"):
        origin = f"{origin} (source {source['name']})"
    state = styled_state(version["state"])
    if version.get("state_reason"):
        state.append(f"  {version['state_reason']}", style="dim")
    out.print(Text(f"{model['name']} {version['version']}", style="bold").append(f"  {version['id']}"))
    fields(
        [
            ("state", state),
            *facts_rows(version),
            ("sha256", version.get("artifact_sha256")),
            ("source", origin),
            ("submitted by", version.get("submitted_by")),
            ("created", when(version.get("created_at"))),
        ]
    )
    show_scan(version.get("scan") or {})
    show_decision(version.get("decision") or {})


def show_approvals(version: dict[str, Any]) -> None:
    approvals = version.get("approvals") or []
    if not approvals:
        out.print("Approvals: none yet")
        return
    rows = [{**a, "created_at": when(a.get("created_at"))} for a in approvals]
    table(rows, ["verdict", "approver", "note", "created_at"], title="Approvals")


def next_steps(model: dict[str, Any], version: dict[str, Any]) -> None:
    name, ver, state = model["name"], version["version"], version["state"]
    if state == "pending_approval":
        out.print(
            Text("Next: waiting for approval. ", style="yellow").append(
                "Ask someone with library:approve (a library approver or an admin) other than the submitter "
                f"({version.get('submitted_by')}) to run `converge models approve {name} {ver}`.",
                style="",
            )
        )
    elif state == "approved":
        out.print(Text(f"Next: {name} {ver} is approved and can be deployed.", style="green"))
    elif state == "rejected":
        reason = version.get("state_reason") or "see the policy decision above"
        out.print(
            Text(f"Rejected: {reason}. ", style="red").append(
                "Fix the cause and add it again as a new version.", style=""
            )
        )
    elif state in ("deprecated", "revoked"):
        out.print(Text(f"{name} {ver} is {state}.", style=STATE_STYLE[state]))


def versions_summary(versions: list[dict[str, Any]], shown: int = 3) -> Text:
    text = Text()
    for i, v in enumerate(versions[-shown:]):
        if i:
            text.append(", ")
        text.append(v["version"] + " ").append(styled_state(v["state"]))
    if len(versions) > shown:
        text.append(f" (+{len(versions) - shown} older)", style="dim")
    return text


# ---------------------------------------------------------------------------------------------
# Models: commands


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=cli_client.err,
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with _progress() as progress:
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
    with _progress() as progress:
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
    uri: str | None = None
    local: Path | None = None
    if artifact.startswith(("s3://", "oci://")):
        uri = artifact
    elif artifact.startswith("server:"):
        uri = artifact.removeprefix("server:")
        if not uri.startswith("/"):
            die(f"A server path must be absolute, e.g. server:/data/models/x.gguf (got '{artifact}')")
    else:
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
    if verify and local is None:
        die("--verify hashes a local file; for a URI pass the expected digest with --sha256")

    client = api(profile)
    model = find_model(client, name)
    if model is None:
        body = {"name": name, "description": description, "tags": tag or []}
        resp = send(client, "POST", "/models", json=body)
        if resp.status_code == 409:  # created meanwhile by someone else
            model = get_model(client, name)
        elif resp.status_code >= 400:
            fail(resp)
        else:
            model = {**resp.json(), "versions": []}
            note(f"Created model [bold]{escape(model['name'])}[/]")
    elif description or tag:
        note("The model exists already: --description and --tag only apply when it is created")

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
        with cli_client.err.status(f"Fetching {escape(str(uri))} on the server, then scanning..."):
            created = call_json(
                client,
                "POST",
                f"/models/{model['id']}/versions",
                json={"version": version, "uri": uri, "sha256": digest},
                timeout=SLOW,
            )
    out.print(f"Registered [bold]{escape(model['name'])} {escape(created['version'])}[/]")
    show_version(model, created)
    next_steps(model, created)
    if created["state"] == "rejected":
        raise typer.Exit(1)


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
    params = {"name": name, "tag": tag, "format": format, "state": state.value if state else None}
    params = {k: v for k, v in params.items() if v is not None} | {"limit": min(limit, 500)}
    rows = []
    for m in paged(client, "/models", params, limit=limit):
        detail = call_json(client, "GET", f"/models/{m['id']}")
        rows.append({**m, "versions": versions_summary(detail["versions"])})
    if not rows:
        out.print(
            "No models match"
            if len(params) > 1
            else "The library is empty: add one with `converge models add`"
        )
        return
    table(rows, ["name", "versions", "tags", "visibility", "created_by", "id"], title="Models")


@models.command("show")
def models_show(
    name: Annotated[str, typer.Argument(help=NAME_HELP)],
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
    fields(
        [
            ("name", Text(model["name"], style="bold")),
            ("id", model["id"]),
            ("description", model.get("description") or None),
            ("tags", model.get("tags") or None),
            ("visibility", model.get("visibility")),
            ("projects", model.get("projects") or None),
            ("created by", model.get("created_by")),
            ("created", when(model.get("created_at"))),
        ]
    )
    if not model["versions"]:
        out.print("No versions yet: add one with `converge models add PATH --name " + model["name"] + "`")
        return
    rows = []
    for v in model["versions"]:
        insp = v.get("inspection") or {}
        rows.append(
            {
                "version": v["version"],
                "state": styled_state(v["state"]),
                "format": v.get("format"),
                "parameters": human_count(insp.get("parameter_count")),
                "quantization": insp.get("quantization"),
                "scan": (v.get("scan") or {}).get("status"),
                "approvals": sum(a["verdict"] == "approve" for a in v.get("approvals") or []),
                "submitted_by": v.get("submitted_by"),
                "created": when(v.get("created_at")),
            }
        )
    columns = ["version", "state", "format", "parameters", "quantization", "scan", "approvals"]
    table(rows, [*columns, "submitted_by", "created"], title="Versions")


def _verdict(action: str, name: str, version: str, note_text: str, profile: str | None) -> None:
    client = api(profile)
    model = get_model(client, name)
    chosen = get_version(model, version)
    path = f"/models/{model['id']}/versions/{chosen['id']}/{action}"
    updated = call_json(client, "POST", path, json={"note": note_text})
    line = Text(f"{model['name']} {updated['version']}: ").append(styled_state(updated["state"]))
    out.print(line)
    if action == "approve" and updated["state"] == "pending_approval":
        count = sum(a["verdict"] == "approve" for a in updated.get("approvals") or [])
        out.print(f"Your approval is recorded ({count} so far); the version still needs more approvals.")


@models.command("approve")
def models_approve(
    name: Annotated[str, typer.Argument(help=NAME_HELP)],
    version: Annotated[str, typer.Argument(help=VERSION_HELP)],
    note_text: Annotated[str, typer.Option("--note", help="Why you approve")] = "",
    profile: ProfileOpt = None,
) -> None:
    """Approve a version pending approval (needs library:approve: a library approver or an admin;
    never your own submission)."""
    _verdict("approve", name, version, note_text, profile)


@models.command("reject")
def models_reject(
    name: Annotated[str, typer.Argument(help=NAME_HELP)],
    version: Annotated[str, typer.Argument(help=VERSION_HELP)],
    note_text: Annotated[str, typer.Option("--note", help="Why: shown to the submitter")],
    profile: ProfileOpt = None,
) -> None:
    """Reject a version (a library approver, or the submitting project while only it deploys the
    model). Rejection is final."""
    _verdict("reject", name, version, note_text, profile)


def show_revocation_plan(model: dict[str, Any], plan: dict[str, Any]) -> None:
    what = f"Revoking {model['name']} {plan['version']} ({plan['state']})"
    if not plan["deployment_count"]:
        out.print(Text(f"{what} would stop no deployments. Nothing was changed."))
        return
    projects = len(plan["projects"])
    out.print(
        Text(f"{what} would stop {plan['deployment_count']} deployment(s) in {projects} project(s). ").append(
            "Nothing was changed.", style="dim"
        )
    )
    rows = [
        {"project": p["name"], "deployment": d["name"], "phase": d["phase"], "id": d["id"]}
        for p in plan["projects"]
        for d in p["deployments"]
    ]
    table(rows, ["project", "deployment", "phase", "id"], title="Deployments that would stop")


@models.command("revoke")
def models_revoke(
    name: Annotated[str, typer.Argument(help=NAME_HELP)],
    version: Annotated[str, typer.Argument(help=VERSION_HELP)],
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
        plan = call_json(client, "POST", path, params={"dry_run": "true"}, json={"reason": reason or ""})
        show_revocation_plan(model, plan)
        return
    updated = call_json(client, "POST", path, json={"reason": reason})
    out.print(Text(f"{model['name']} {updated['version']}: ").append(styled_state(updated["state"])))


@models.command("deprecate")
def models_deprecate(
    name: Annotated[str, typer.Argument(help=NAME_HELP)],
    version: Annotated[str, typer.Argument(help=VERSION_HELP)],
    note_text: Annotated[str, typer.Option("--note", help="Why, e.g. what replaces it")] = "",
    profile: ProfileOpt = None,
) -> None:
    """Deprecate an approved version (needs library:govern, like revoke): still deployable, flagged as old."""
    _verdict("deprecate", name, version, note_text, profile)


# ---------------------------------------------------------------------------------------------
# Policies


def get_policy(client: Api, ref: str) -> dict[str, Any]:
    if is_uuid(ref):
        return call_json(client, "GET", f"/policies/{ref}")
    for policy in pages(client, "/policies", {"limit": 500}):
        if policy["name"] == ref:
            return policy
    die(f"No policy named '{ref}'; `converge policies list` shows them")


def call_expression(client: Api, method: str, path: str, expression: str | None, **kwargs: Any) -> Any:
    """Like Api.call; a CEL syntax error is shown under the expression with a caret."""
    resp = send(client, method, path, **kwargs)
    if resp.status_code == 422 and expression:
        try:
            problem = resp.json()
        except ValueError:
            problem = {}
        line, column = problem.get("line"), problem.get("column")
        if isinstance(line, int) and isinstance(column, int):
            lines = expression.splitlines() or [""]
            source = lines[min(max(line, 1), len(lines)) - 1]
            err = cli_client.err
            err.print(f"[red]Error 422:[/] {escape(str(problem.get('detail')))}")
            err.print(Text(f"  {line:>3} | {source}"))
            err.print(Text(" " * (8 + max(column - 1, 0)) + "^", style="bold red"))
            raise typer.Exit(1)
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
            ("enabled", Text("yes", style="green") if policy["enabled"] else Text("no", style="dim")),
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
    rows = paged(api(profile), "/policies", params)
    for r in rows:
        r["enabled"] = Text("yes", style="green") if r["enabled"] else Text("no", style="dim")
    columns = ["name", "scope", "effect", "enabled", "revision", "expression"]
    table(rows, columns, title="Policies")


@policies.command("show")
def policies_show(
    name: Annotated[str, typer.Argument(help="Policy name or id")], profile: ProfileOpt = None
) -> None:
    """One policy and its revision history."""
    client = api(profile)
    policy = get_policy(client, name)
    show_policy(policy)
    revisions = call_json(client, "GET", f"/policies/{policy['id']}/revisions")
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
    out.print(f"Created policy [bold]{escape(policy['name'])}[/] ({policy['id']})")
    show_policy(policy)


@policies.command("update")
def policies_update(
    name: Annotated[str, typer.Argument(help="Policy name or id")],
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
    out.print(f"Updated policy [bold]{escape(updated['name'])}[/]: revision {updated['revision']}")
    show_policy(updated)


@policies.command("delete")
def policies_delete(
    name: Annotated[str, typer.Argument(help="Policy name or id")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask")] = False,
    profile: ProfileOpt = None,
) -> None:
    """Delete a policy (to keep its history, `update --disable` it instead)."""
    client = api(profile)
    policy = get_policy(client, name)
    if not yes:
        typer.confirm(f"Delete policy {policy['name']}?", abort=True)
    call_json(client, "DELETE", f"/policies/{policy['id']}")
    out.print(f"Deleted policy {escape(policy['name'])}")


@policies.command("dry-run")
def policies_dry_run(
    name: Annotated[str, typer.Argument(help="Policy name or id")],
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
    body = {"expression": expression, "message": message, "effect": effect.value if effect else None}
    body = {k: v for k, v in body.items() if v is not None} | {"limit": limit}
    result = call_expression(client, "POST", f"/policies/{policy['id']}/dry-run", expression, json=body)
    draft = " (draft)" if expression or message or effect else ""
    out.print(
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
    doc = call_json(api(profile), "GET", "/policies/facts")
    rows = [
        {"fact": f"{section}.{key}", "meaning": meaning}
        for section, keys in doc.items()
        for key, meaning in keys.items()
    ]
    table(rows, ["fact", "meaning"], title="Policy facts")


# ---------------------------------------------------------------------------------------------
# Sources


def get_source(client: Api, ref: str) -> dict[str, Any]:
    if is_uuid(ref):
        return call_json(client, "GET", f"/sources/{ref}")
    for source in pages(client, "/sources", {"limit": 500}):
        if source["name"] == ref:
            return source
    die(f"No source named '{ref}'; `converge sources list` shows them")


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
            ("enabled", Text("yes", style="green") if source["enabled"] else Text("no", style="dim")),
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
    for s in paged(api(profile), "/sources", {"limit": 500}):
        rows.append(
            {
                **s,
                "interval": f"{s['interval_s']:g}s",
                "enabled": Text("yes", style="green") if s["enabled"] else Text("no", style="dim"),
                "last sync": when(s.get("last_sync_at")) or "never",
                "last error": Text(s["last_error"] or "", style="red"),
                "next run": when(s.get("next_run_at")) if s["enabled"] else "disabled",
            }
        )
    if not rows:
        out.print("No sources yet: an admin adds one with `converge sources add`")
        return
    columns = ["name", "kind", "uri", "model_name", "interval", "enabled", "last sync", "last error"]
    table(rows, [*columns, "next run"], title="Sources")


@sources.command("add")
def sources_add(
    name: Annotated[str, typer.Option("--name", help="Lowercase source name")],
    uri: Annotated[str, typer.Option(help="oci://registry/repository or s3://bucket/prefix")],
    model: Annotated[str, typer.Option("--model", help="Library model that new items become versions of")],
    kind: Annotated[Kind | None, typer.Option(help="oci or s3; default: the URI's scheme")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between syncs (1-86400)")] = 60.0,
    endpoint: Annotated[str | None, typer.Option(help="S3 endpoint URL (MinIO, ...)")] = None,
    region: Annotated[str | None, typer.Option(help="S3 region")] = None,
    access_key_id: Annotated[str | None, typer.Option(help="S3 access key id")] = None,
    secret_access_key: Annotated[
        str | None, typer.Option(help="S3 secret key (stored on the server, never shown again)")
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
        if scheme not in ("oci", "s3"):
            die(f"Cannot tell the kind from '{uri}': it must start with oci:// or s3://")
        kind = Kind(scheme)
    options = {
        "endpoint": endpoint,
        "region": region,
        "access_key_id": access_key_id,
        "secret_access_key": secret_access_key,
        "insecure": insecure,
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
    source = call_json(api(profile), "POST", "/sources", json=body)
    out.print(f"Added source [bold]{escape(source['name'])}[/] ({source['id']})")
    show_source(source)


@sources.command("show")
def sources_show(
    name: Annotated[str, typer.Argument(help="Source name or id")], profile: ProfileOpt = None
) -> None:
    """One source: settings, last sync, last error, next run."""
    show_source(get_source(api(profile), name))


@sources.command("update")
def sources_update(
    name: Annotated[str, typer.Argument(help="Source name or id")],
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
    show_source(call_json(client, "PATCH", f"/sources/{source['id']}", json=body))


@sources.command("sync")
def sources_sync(
    name: Annotated[str, typer.Argument(help="Source name or id")], profile: ProfileOpt = None
) -> None:
    """Sync now instead of waiting for the next run. Exits 1 if the sync failed."""
    client = api(profile)
    source = get_source(client, name)
    with cli_client.err.status(f"Syncing {escape(source['name'])}..."):
        result = call_json(client, "POST", f"/sources/{source['id']}/sync", timeout=SLOW)
    synced = result["source"]
    new = result["new_versions"]
    if synced.get("last_error"):
        show_source(synced)
        die(f"Sync of {synced['name']} failed: {synced['last_error']}")
    if new:
        model = escape(synced["model_name"])
        out.print(f"{len(new)} new version(s) of [bold]{model}[/]: {escape(', '.join(new))}")
        out.print(f"See them with `converge models show {model}`")
    else:
        out.print(f"Synced {escape(synced['name'])}: nothing new")


@sources.command("delete")
def sources_delete(
    name: Annotated[str, typer.Argument(help="Source name or id")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask")] = False,
    profile: ProfileOpt = None,
) -> None:
    """Delete a source. Versions it registered stay; new ones from its URI count as unknown."""
    client = api(profile)
    source = get_source(client, name)
    if not yes:
        typer.confirm(f"Delete source {source['name']}?", abort=True)
    call_json(client, "DELETE", f"/sources/{source['id']}")
    out.print(f"Deleted source {escape(source['name'])}")

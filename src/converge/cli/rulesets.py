"""`converge rulesets ...`: system instructions and guardrails, versioned, and attaching one as
a deployment's default (the gateway then holds every client of that deployment to it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from converge.cli.client import Api, ProfileOpt, YesOpt, api
from converge.cli.output import die, echo, fields, table, when

rulesets = typer.Typer(
    help="Rulesets: system instructions, blocked terms and patterns, PII redaction, a token cap.",
    no_args_is_help=True,
)
ProjectOpt = Annotated[str, typer.Option("--project", "-p", help="Project name or id")]
RulesetArg = Annotated[str, typer.Argument(help="Ruleset name or id")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON answer")]
FileOpt = Annotated[
    Path | None, typer.Option("--file", "-f", help="A JSON spec: {system, input: {...}, output: {...}}")
]
SystemOpt = Annotated[
    str | None, typer.Option("--system", help="System instructions prepended to every chat")
]
BlockOpt = Annotated[
    list[str] | None, typer.Option("--block", help="A term user messages may not hold (repeat)")
]
PatternOpt = Annotated[
    list[str] | None, typer.Option("--pattern", help="NAME=REGEX refusing user messages (repeat)")
]
RedactOpt = Annotated[
    list[str] | None, typer.Option("--redact", help="email, phone or card: redacted in input (repeat)")
]
OutBlockOpt = Annotated[list[str] | None, typer.Option("--output-block", help="A term answers may not hold")]
OutPatternOpt = Annotated[
    list[str] | None, typer.Option("--output-pattern", help="NAME=REGEX refusing answers")
]
OutRedactOpt = Annotated[
    list[str] | None,
    typer.Option("--output-redact", help="email, phone or card: redacted in answers (repeat)"),
]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", help="Cap on completion tokens")]


def _ruleset(client: Api, *, project_id: str, ref: str) -> dict[str, Any]:
    found = client.named("/rulesets", ref, params={"project": project_id})
    if found is None:
        die(f"No ruleset '{ref}' in this project")
    return found


def _patterns(values: list[str]) -> list[dict[str, str]]:
    out = []
    for value in values:
        name, sep, regex = value.partition("=")
        if not sep or not name or not regex:
            die(f"--pattern takes NAME=REGEX, not '{value}'")
        out.append({"name": name, "regex": regex})
    return out


def _spec(base: dict[str, Any], *, file: Path | None, options: dict[str, Any]) -> dict[str, Any] | None:
    """The spec to send: the file's, else the base with the options given replacing its parts;
    None when nothing about the spec was given."""
    if file is not None:
        try:
            return dict(json.loads(file.read_text()))
        except (OSError, ValueError) as exc:
            die(f"Cannot read a JSON spec from {file}: {exc}")
    given = {k: v for k, v in options.items() if v is not None}
    if not given:
        return None
    spec = json.loads(json.dumps(base or {}))
    spec.setdefault("input", {})
    spec.setdefault("output", {})
    for key, value in given.items():
        if key == "system":
            spec["system"] = value
        else:
            where, field = key.split(".")
            spec[where][field] = _patterns(value) if field == "patterns" else value
    return spec


def _options(**values: Any) -> dict[str, Any]:
    return {
        "system": values["system"],
        "input.blocked_terms": values["block"],
        "input.patterns": values["pattern"],
        "input.redact": values["redact"],
        "output.blocked_terms": values["output_block"],
        "output.patterns": values["output_pattern"],
        "output.redact": values["output_redact"],
        "output.max_tokens": values["max_tokens"],
    }


def _show(r: dict[str, Any], *, as_json: bool = False) -> None:
    if as_json:
        echo(json.dumps(r, indent=2))
        return
    spec = r.get("spec") or {}
    fields(
        [
            ("name", r["name"]),
            ("id", r["id"]),
            ("version", r["version"]),
            ("description", r.get("description") or None),
            ("system", spec.get("system") or None),
            ("input", json.dumps(spec.get("input"))),
            ("output", json.dumps(spec.get("output"))),
            ("default of", ", ".join(r.get("deployments") or []) or None),
            ("updated", when(r.get("updated_at"))),
        ]
    )


@rulesets.command("create")
def rulesets_create(
    name: Annotated[str, typer.Argument(help="Name, unique in the project (lowercase, digits, -)")],
    *,
    project: ProjectOpt,
    description: Annotated[str, typer.Option(help="What it is for")] = "",
    file: FileOpt = None,
    system: SystemOpt = None,
    block: BlockOpt = None,
    pattern: PatternOpt = None,
    redact: RedactOpt = None,
    output_block: OutBlockOpt = None,
    output_pattern: OutPatternOpt = None,
    output_redact: OutRedactOpt = None,
    max_tokens: MaxTokensOpt = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Create a ruleset (version 1) from options or a JSON spec file."""
    client = api(profile)
    options = _options(
        system=system,
        block=block,
        pattern=pattern,
        redact=redact,
        output_block=output_block,
        output_pattern=output_pattern,
        output_redact=output_redact,
        max_tokens=max_tokens,
    )
    body = {"name": name, "description": description, "spec": _spec({}, file=file, options=options) or {}}
    made = client.call("POST", "/rulesets", params={"project": client.project_id(project)}, json=body)
    _show(made, as_json=as_json)


@rulesets.command("list")
def rulesets_list(project: ProjectOpt, *, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """The project's rulesets."""
    client = api(profile)
    items = list(client.paged("/rulesets", params={"project": client.project_id(project)}))
    if as_json:
        echo(json.dumps(items, indent=2))
        return
    rows = [
        {
            "name": r["name"],
            "version": r["version"],
            "deployments": len(r.get("deployments") or []),
            "updated": when(r.get("updated_at")),
            "id": r["id"],
        }
        for r in items
    ]
    table(rows, ["name", "version", "deployments", "updated", "id"], title="Rulesets")


@rulesets.command("show")
def rulesets_show(
    ref: RulesetArg,
    *,
    project: ProjectOpt,
    versions: Annotated[bool, typer.Option("--versions", help="Also list every version")] = False,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """A ruleset's current version (and, with --versions, its history)."""
    client = api(profile)
    found = _ruleset(client, project_id=client.project_id(project), ref=ref)
    _show(found, as_json=as_json)
    if versions:
        rows = [
            {"version": v["version"], "author": v["author"], "created": when(v["created_at"])}
            for v in client.paged(f"/rulesets/{found['id']}/versions")
        ]
        table(rows, ["version", "author", "created"], title="Versions")


@rulesets.command("update")
def rulesets_update(
    ref: RulesetArg,
    *,
    project: ProjectOpt,
    description: Annotated[str | None, typer.Option(help="A new description")] = None,
    file: FileOpt = None,
    system: SystemOpt = None,
    block: BlockOpt = None,
    pattern: PatternOpt = None,
    redact: RedactOpt = None,
    output_block: OutBlockOpt = None,
    output_pattern: OutPatternOpt = None,
    output_redact: OutRedactOpt = None,
    max_tokens: MaxTokensOpt = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Change a ruleset: the options given replace those parts of the current spec (or --file
    replaces it whole); a changed spec is a new version."""
    client = api(profile)
    found = _ruleset(client, project_id=client.project_id(project), ref=ref)
    options = _options(
        system=system,
        block=block,
        pattern=pattern,
        redact=redact,
        output_block=output_block,
        output_pattern=output_pattern,
        output_redact=output_redact,
        max_tokens=max_tokens,
    )
    body: dict[str, Any] = {}
    if (spec := _spec(found.get("spec") or {}, file=file, options=options)) is not None:
        body["spec"] = spec
    if description is not None:
        body["description"] = description
    if not body:
        die("Nothing to change: give --file, a spec option or --description")
    _show(client.call("PATCH", f"/rulesets/{found['id']}", json=body), as_json=as_json)


@rulesets.command("delete")
def rulesets_delete(
    ref: RulesetArg, *, project: ProjectOpt, yes: YesOpt = False, profile: ProfileOpt = None
) -> None:
    """Delete a ruleset (refused while a deployment, RAG model or agent uses it)."""
    client = api(profile)
    found = _ruleset(client, project_id=client.project_id(project), ref=ref)
    client.delete(f"/rulesets/{found['id']}", ask=None if yes else f"Delete ruleset '{found['name']}'?")
    echo(f"deleted ruleset {found['name']}")


def _deployment(client: Api, *, project_id: str, ref: str) -> dict[str, Any]:
    found = client.named("/deployments", ref, params={"project": project_id})
    if found is None:
        die(f"No deployment '{ref}' in this project")
    return found


@rulesets.command("attach")
def rulesets_attach(
    ref: RulesetArg,
    deployment: Annotated[str, typer.Argument(help="Deployment name or id")],
    *,
    project: ProjectOpt,
    profile: ProfileOpt = None,
) -> None:
    """Make the ruleset the deployment's default: every request to it, from any client."""
    client = api(profile)
    project_id = client.project_id(project)
    found = _ruleset(client, project_id=project_id, ref=ref)
    target = _deployment(client, project_id=project_id, ref=deployment)
    client.call("PUT", f"/rulesets/{found['id']}/deployments/{target['id']}")
    echo(f"ruleset {found['name']} is now the default of deployment {target['name']}")


@rulesets.command("detach")
def rulesets_detach(
    ref: RulesetArg,
    deployment: Annotated[str, typer.Argument(help="Deployment name or id")],
    *,
    project: ProjectOpt,
    profile: ProfileOpt = None,
) -> None:
    """Stop applying the ruleset to the deployment by default."""
    client = api(profile)
    project_id = client.project_id(project)
    found = _ruleset(client, project_id=project_id, ref=ref)
    target = _deployment(client, project_id=project_id, ref=deployment)
    client.call("DELETE", f"/rulesets/{found['id']}/deployments/{target['id']}")
    echo(f"ruleset {found['name']} no longer applies to deployment {target['name']}")

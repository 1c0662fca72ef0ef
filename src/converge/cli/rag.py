"""`converge rag ...`: RAG models (a chat deployment over knowledge bases, called by name)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from converge.cli.client import Api, ProfileOpt, YesOpt, api
from converge.cli.output import die, echo, fields, table, when

rag = typer.Typer(
    help="RAG models: a chat deployment answering from knowledge bases, with citations; any OpenAI "
    "client calls one by name.",
    no_args_is_help=True,
)
ProjectOpt = Annotated[str, typer.Option("--project", "-p", help="Project name or id")]
ModelArg = Annotated[str, typer.Argument(help="RAG model name or id")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON answer")]


def _model(client: Api, *, project_id: str, ref: str) -> dict[str, Any]:
    found = client.named("/rag/models", ref, params={"project": project_id})
    if found is None:
        die(f"No RAG model '{ref}' in this project")
    return found


def _retrieval(*, k: int | None, mode: str | None, min_score: float | None) -> dict[str, Any]:
    given = {"k": k, "mode": mode, "min_score": min_score}
    return {key: v for key, v in given.items() if v is not None}


@rag.command("create")
def rag_create(
    name: Annotated[str, typer.Argument(help="Name, unique in the project (lowercase, digits, -)")],
    *,
    project: ProjectOpt,
    chat: Annotated[str, typer.Option("--chat", help="The chat deployment (name or id) that answers")],
    kb: Annotated[list[str], typer.Option("--kb", help="A knowledge base (name or id); repeat for more")],
    ruleset: Annotated[str | None, typer.Option(help="A ruleset (name or id) of the project")] = None,
    k: Annotated[int | None, typer.Option(help="Chunks retrieved per question (default 5)")] = None,
    mode: Annotated[str | None, typer.Option(help="vector, keyword or hybrid (default)")] = None,
    min_score: Annotated[float | None, typer.Option(help="Drop chunks scoring below this (0..1)")] = None,
    template: Annotated[
        Path | None, typer.Option(help="A prompt template file holding {context} and {question}")
    ] = None,
    description: Annotated[str, typer.Option(help="What it answers")] = "",
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Create a RAG model; it is listed by `GET /v1/models` and answers `/v1/chat/completions`."""
    client = api(profile)
    body: dict[str, Any] = {
        "name": name,
        "description": description,
        "chat_deployment": chat,
        "knowledge_bases": kb,
    }
    if ruleset:
        body["ruleset"] = ruleset
    if retrieval := _retrieval(k=k, mode=mode, min_score=min_score):
        body["retrieval"] = retrieval
    if template is not None:
        body["prompt_template"] = template.read_text()
    made = client.call("POST", "/rag/models", params={"project": client.project_id(project)}, json=body)
    _show(made, as_json=as_json)


@rag.command("list")
def rag_list(project: ProjectOpt, profile: ProfileOpt = None) -> None:
    """The project's RAG models."""
    client = api(profile)
    rows = [
        {
            "name": m["name"],
            "revision": m["revision"],
            "chat deployment": m["spec"]["chat_deployment"]["name"],
            "knowledge bases": [b["name"] for b in m["spec"]["knowledge_bases"]],
            "updated": when(m.get("updated_at")),
            "id": m["id"],
        }
        for m in client.paged("/rag/models", params={"project": client.project_id(project)})
    ]
    table(rows, ["name", "revision", "chat deployment", "knowledge bases", "updated", "id"])


@rag.command("show")
def rag_show(
    ref: ModelArg, *, project: ProjectOpt, as_json: JsonOpt = False, profile: ProfileOpt = None
) -> None:
    """A RAG model: what answers, from which bases, how it retrieves."""
    client = api(profile)
    found = _model(client, project_id=client.project_id(project), ref=ref)
    _show(client.call("GET", f"/rag/models/{found['id']}"), as_json=as_json)


@rag.command("update")
def rag_update(
    ref: ModelArg,
    *,
    project: ProjectOpt,
    chat: Annotated[str | None, typer.Option("--chat", help="Another chat deployment")] = None,
    kb: Annotated[list[str] | None, typer.Option("--kb", help="Replace the knowledge bases")] = None,
    ruleset: Annotated[str | None, typer.Option(help="A ruleset; 'none' removes it")] = None,
    k: Annotated[int | None, typer.Option()] = None,
    mode: Annotated[str | None, typer.Option()] = None,
    min_score: Annotated[float | None, typer.Option()] = None,
    template: Annotated[Path | None, typer.Option(help="A new prompt template file")] = None,
    description: Annotated[str | None, typer.Option()] = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Change a RAG model; every change of what answers or how is a new revision."""
    client = api(profile)
    found = _model(client, project_id=client.project_id(project), ref=ref)
    body: dict[str, Any] = {}
    if chat:
        body["chat_deployment"] = chat
    if kb:
        body["knowledge_bases"] = kb
    if ruleset is not None:
        body["ruleset"] = None if ruleset == "none" else ruleset
    if retrieval := _retrieval(k=k, mode=mode, min_score=min_score):
        body["retrieval"] = {**found["spec"]["retrieval"], **retrieval}
    if template is not None:
        body["prompt_template"] = template.read_text()
    if description is not None:
        body["description"] = description
    if not body:
        die("Nothing to change: give at least one option")
    _show(client.call("PATCH", f"/rag/models/{found['id']}", json=body), as_json=as_json)


@rag.command("delete")
def rag_delete(
    ref: ModelArg, *, project: ProjectOpt, yes: YesOpt = False, profile: ProfileOpt = None
) -> None:
    """Delete a RAG model (recorded chat turns keep naming it)."""
    client = api(profile)
    found = _model(client, project_id=client.project_id(project), ref=ref)
    client.delete(f"/rag/models/{found['id']}", ask=None if yes else f"Delete RAG model '{found['name']}'?")
    echo(f"Deleted RAG model [bold]{found['name']}[/]")


def _show(m: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        echo(json.dumps(m, indent=2))
        return
    spec = m["spec"]
    ruleset = spec.get("ruleset")
    fields(
        [
            ("name", m["name"]),
            ("id", m["id"]),
            ("revision", m["revision"]),
            ("description", m.get("description") or None),
            ("chat deployment", spec["chat_deployment"]["name"]),
            ("knowledge bases", ", ".join(b["name"] for b in spec["knowledge_bases"])),
            ("ruleset", ruleset["name"] if ruleset else None),
            ("retrieval", json.dumps(spec["retrieval"])),
            ("prompt template", spec["prompt_template"]),
            ("updated", when(m.get("updated_at"))),
        ],
        title="RAG model",
    )

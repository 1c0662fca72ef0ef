"""`converge kb ...`: knowledge bases, their ingestion jobs, search and the recall probe."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import IO, Annotated, Any

import httpx
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text

from converge.cli.client import SLOW, Api, ProfileOpt, YesOpt, api, fail
from converge.cli.output import die, echo, err, fields, human_count, table, transfer, when

kb = typer.Typer(
    help="Knowledge bases: documents chunked and embedded for retrieval (RAG).", no_args_is_help=True
)
ProjectOpt = Annotated[str, typer.Option("--project", "-p", help="Project name or id")]
KbArg = Annotated[str, typer.Argument(help="Knowledge base name or id")]
# What ingestion reads; anything else in a folder given to `ingest` is skipped (and said so).
SUFFIXES = frozenset({".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl"})
FINAL = frozenset({"succeeded", "failed", "cancelled"})


def _base(client: Api, *, project_id: str, ref: str) -> dict[str, Any]:
    found = client.named("/knowledge-bases", ref, params={"project": project_id})
    if found is None:
        die(f"No knowledge base '{ref}' in this project")
    return found


@kb.command("create")
def kb_create(
    name: Annotated[str, typer.Argument(help="Name, unique in the project (lowercase, digits, -)")],
    *,
    project: ProjectOpt,
    embedding: Annotated[
        str, typer.Option("--embedding", "-e", help="The embedding deployment (name or id) that embeds it")
    ],
    description: Annotated[str, typer.Option(help="What it holds")] = "",
    chunk_tokens: Annotated[
        int | None, typer.Option(help="Tokens per chunk (default: 256 or the model's maximum)")
    ] = None,
    overlap: Annotated[int | None, typer.Option(help="Tokens shared by neighbouring chunks")] = None,
    k: Annotated[int | None, typer.Option(help="Results a search returns by default")] = None,
    mode: Annotated[str | None, typer.Option(help="Default search mode: vector, keyword or hybrid")] = None,
    profile: ProfileOpt = None,
) -> None:
    """Create a knowledge base bound to an embedding deployment (its dimension is read from it)."""
    client = api(profile)
    body: dict[str, Any] = {"name": name, "description": description, "embedding_deployment": embedding}
    chunking = {key: v for key, v in {"tokens": chunk_tokens, "overlap": overlap}.items() if v is not None}
    retrieval = {key: v for key, v in {"k": k, "mode": mode}.items() if v is not None}
    if chunking:
        body["chunking"] = chunking
    if retrieval:
        body["retrieval"] = retrieval
    made = client.call("POST", "/knowledge-bases", params={"project": client.project_id(project)}, json=body)
    _show(made)


@kb.command("list")
def kb_list(project: ProjectOpt, profile: ProfileOpt = None) -> None:
    """The project's knowledge bases."""
    client = api(profile)
    rows = [
        {
            "name": b["name"],
            "documents": b.get("stats", {}).get("documents"),
            "chunks": human_count(b.get("stats", {}).get("chunks")),
            "index": (b.get("index") or {}).get("state"),
            "last ingested": when(b.get("last_ingested_at")),
            "id": b["id"],
        }
        for b in client.paged("/knowledge-bases", params={"project": client.project_id(project)})
    ]
    table(rows, ["name", "documents", "chunks", "index", "last ingested", "id"])


@kb.command("show")
def kb_show(ref: KbArg, *, project: ProjectOpt, profile: ProfileOpt = None) -> None:
    """A knowledge base: its model, chunking, counts, index and last recall probe."""
    client = api(profile)
    base = _base(client, project_id=client.project_id(project), ref=ref)
    _show(client.call("GET", f"/knowledge-bases/{base['id']}"))


def _show(b: dict[str, Any]) -> None:
    stats, index, probe = b.get("stats") or {}, b.get("index") or {}, b.get("probe") or {}
    rows: list[tuple[str, Any]] = [
        ("name", b["name"]),
        ("id", b["id"]),
        ("description", b.get("description")),
        ("embedding deployment", b.get("embedding_deployment_id")),
        ("dimension", b.get("dimension")),
        ("max tokens", b.get("max_tokens")),
        ("chunking", json.dumps(b.get("chunking"))),
        ("retrieval", json.dumps(b.get("retrieval"))),
        ("documents", stats.get("documents")),
        ("chunks", stats.get("chunks")),
        ("bytes", stats.get("bytes")),
        ("index", f"{index.get('state')} (ef_search {index.get('ef_search')})" if index else None),
        ("metadata fields", ", ".join(b.get("metadata_keys") or []) or None),
        ("last ingested", when(b.get("last_ingested_at"))),
    ]
    if probe:
        rows.append(("last probe", _probe_line(probe)))
    fields(rows, title="knowledge base")


def _probe_line(p: dict[str, Any]) -> str:
    latency = p.get("latency") or {}
    measured = latency.get("approximate") or latency.get("exact") or {}
    line = f"recall@{p.get('k')} {p.get('recall')} over {p.get('queries')} queries"
    if p.get("exact"):
        line += " (exact search: the base is small enough to scan)"
    else:
        line += f", ef_search {p.get('ef_search')}" + ("" if p.get("target_met") else " (target not met)")
    if measured:
        line += f", p50 {measured.get('p50_ms')} ms, p95 {measured.get('p95_ms')} ms"
    return line


# ---------------------------------------------------------------------------------------------
# Ingestion


def expand(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """The files to ingest under `paths` (folders walked in name order) and those skipped."""
    files: list[Path] = []
    skipped: list[Path] = []
    for path in paths:
        if not path.exists():
            die(f"{path}: no such file or folder")
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in found:
            (files if f.suffix.lower() in SUFFIXES else skipped).append(f)
    return files, skipped


class _Counted:
    """A file whose reads advance its own bar and the overall one (httpx reads it in chunks)."""

    def __init__(self, fh: IO[bytes], progress: Progress, *, task: TaskID, total: TaskID) -> None:
        self.fh, self.progress, self.task, self.total = fh, progress, task, total

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.progress.advance(self.task, len(data))
        self.progress.advance(self.total, len(data))
        return data

    def __getattr__(self, name: str) -> Any:  # seek, tell, name: what httpx asks of a file
        return getattr(self.fh, name)


def _upload(client: Api, base: dict[str, Any], *, files: list[Path]) -> dict[str, Any]:
    with transfer() as progress, contextlib.ExitStack() as stack:
        total = progress.add_task("all files", total=sum(f.stat().st_size for f in files))
        parts = []
        for f in files:
            task = progress.add_task(f.name[:40], total=f.stat().st_size)
            counted = _Counted(stack.enter_context(f.open("rb")), progress, task=task, total=total)
            parts.append(("files", (f.name, counted, "application/octet-stream")))
        try:
            resp = client.request(
                "POST", f"/knowledge-bases/{base['id']}/ingestions", files=parts, timeout=SLOW
            )
        except httpx.TimeoutException:
            die(
                "The server did not answer in time; `converge kb jobs` tells whether the ingestion was queued"
            )
        except httpx.HTTPError as exc:
            die(f"Upload failed: {exc}; nothing was queued by this command")
    if resp.status_code >= 400:
        fail(resp)
    return resp.json()


def follow(
    client: Api, base: dict[str, Any], *, job: dict[str, Any], interval: float = 0.5
) -> dict[str, Any]:
    """Show the job's document and chunk progress until it ends; return the final job."""
    path = f"/knowledge-bases/{base['id']}/ingestions/{job['id']}"
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err) as progress:
        docs = progress.add_task("documents", total=None)
        chunks = progress.add_task("chunks   ", total=None)
        while True:
            p = job.get("progress") or {}
            progress.update(docs, completed=p.get("documents_done", 0), total=p.get("documents_total"))
            progress.update(chunks, completed=p.get("chunks_done", 0), total=p.get("chunks_total"))
            if job["state"] in FINAL:
                return job
            time.sleep(interval)
            job = client.call("GET", path)


@kb.command("ingest")
def kb_ingest(
    ref: KbArg,
    *,
    project: ProjectOpt,
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Files or folders (txt, md, html, pdf, jsonl)", show_default=False),
    ] = None,
    url: Annotated[
        str | None, typer.Option("--url", help="Ingest every object under an s3://bucket/prefix instead")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the job until it ends")] = True,
    profile: ProfileOpt = None,
) -> None:
    """Upload files (or name an object-storage prefix) and ingest them: parse, chunk, embed, index."""
    client = api(profile)
    base = _base(client, project_id=client.project_id(project), ref=ref)
    if url and paths:
        die("Give files or --url, not both")
    if url:
        job = client.call("POST", f"/knowledge-bases/{base['id']}/ingestions", json={"url": url})
    else:
        files, skipped = expand(paths or [])
        for f in skipped:
            echo(Text(f"skipped {f} (not txt, md, html, pdf or jsonl)", style="yellow"))
        if not files:
            die("Nothing to ingest: no txt, md, html, pdf or jsonl files were given")
        job = _upload(client, base, files=files)
    echo(f"ingestion [bold]{job['id']}[/] {job['state']}")
    if wait:
        job = follow(client, base, job=job)
        _job_summary(job)
        if job["state"] != "succeeded":
            raise typer.Exit(1)


def _job_summary(job: dict[str, Any]) -> None:
    p = job.get("progress") or {}
    echo(
        f"ingestion {job['id']} [bold]{job['state']}[/]: {p.get('documents_done', 0)} documents, "
        f"{p.get('chunks_done', 0)} chunks, {p.get('skipped_unchanged', 0)} unchanged"
        + (f" - {job['reason']}" if job.get("reason") else "")
    )
    for error in job.get("errors") or []:
        echo(Text(f"  {error.get('document')}: {error.get('reason')}", style="red"))


@kb.command("jobs")
def kb_jobs(ref: KbArg, *, project: ProjectOpt, limit: int = 20, profile: ProfileOpt = None) -> None:
    """The base's ingestion jobs, newest first."""
    client = api(profile)
    base = _base(client, project_id=client.project_id(project), ref=ref)
    rows = [
        {
            "id": j["id"],
            "state": j["state"],
            "documents": f"{(j.get('progress') or {}).get('documents_done', 0)}/"
            f"{(j.get('progress') or {}).get('documents_total', '?')}",
            "chunks": (j.get("progress") or {}).get("chunks_done", 0),
            "errors": len(j.get("errors") or []),
            "created": when(j.get("created_at")),
        }
        for j in client.paged(f"/knowledge-bases/{base['id']}/ingestions", limit=limit)
    ]
    table(rows, ["id", "state", "documents", "chunks", "errors", "created"])


@kb.command("cancel")
def kb_cancel(
    ref: KbArg, job_id: Annotated[str, typer.Argument(help="The ingestion job's id")], *, project: ProjectOpt,
    profile: ProfileOpt = None,
) -> None:  # fmt: skip
    """Cancel an ingestion: finished documents stay, the one in progress is not written."""
    client = api(profile)
    base = _base(client, project_id=client.project_id(project), ref=ref)
    job = client.call("POST", f"/knowledge-bases/{base['id']}/ingestions/{job_id}/cancel")
    echo(f"ingestion {job['id']} {job['state']}")


# ---------------------------------------------------------------------------------------------
# Retrieval


def parse_filters(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs; a value that reads as JSON (a number, true, null) is taken as such."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            die(f"--filter takes key=value, not '{item}'")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


@kb.command("search")
def kb_search(
    ref: KbArg,
    query: Annotated[str, typer.Argument(help="The question or keywords")],
    *,
    project: ProjectOpt,
    k: Annotated[int | None, typer.Option("--k", "-k", help="How many results")] = None,
    mode: Annotated[str | None, typer.Option(help="vector, keyword or hybrid (default: the base's)")] = None,
    filter_: Annotated[
        list[str] | None, typer.Option("--filter", help="Metadata equality, key=value (repeatable)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw answer")] = False,
    profile: ProfileOpt = None,
) -> None:
    """Search a knowledge base; results with their source, heading path and page."""
    client = api(profile)
    base = _base(client, project_id=client.project_id(project), ref=ref)
    body: dict[str, Any] = {"query": query, "filters": parse_filters(filter_ or [])}
    if k is not None:
        body["k"] = k
    if mode is not None:
        body["mode"] = mode
    found = client.call("POST", f"/knowledge-bases/{base['id']}/search", json=body)
    if as_json:
        echo(json.dumps(found, indent=2))
        return
    rows = [
        {
            "#": i + 1,
            "score": round(hit["score"], 4),
            "source": hit.get("source") or hit.get("title"),
            "where": " > ".join(hit.get("heading_path") or [])
            + (f" (p. {hit['page']})" if hit.get("page") else ""),
            "text": " ".join(hit["text"].split())[:160],
        }
        for i, hit in enumerate(found["results"])
    ]
    table(rows, ["#", "score", "source", "where", "text"], title=f"{found['mode']} search")


@kb.command("probe")
def kb_probe(
    ref: KbArg,
    *,
    project: ProjectOpt,
    queries: Annotated[int, typer.Option(help="Queries sampled from the base's own chunks")] = 50,
    k: Annotated[int, typer.Option("--k", "-k", help="Recall@k")] = 10,
    profile: ProfileOpt = None,
) -> None:
    """Measure recall@k of approximate against exact search; sets the base's ef_search."""
    client = api(profile)
    base = _base(client, project_id=client.project_id(project), ref=ref)
    result = client.call(
        "POST", f"/knowledge-bases/{base['id']}/probe", json={"queries": queries, "k": k}, timeout=SLOW
    )
    echo(_probe_line(result))


@kb.command("delete")
def kb_delete(ref: KbArg, *, project: ProjectOpt, yes: YesOpt = False, profile: ProfileOpt = None) -> None:
    """Delete a knowledge base with its documents, chunks and jobs."""
    client = api(profile)
    base = _base(client, project_id=client.project_id(project), ref=ref)
    client.delete(
        f"/knowledge-bases/{base['id']}", ask=None if yes else f"Delete knowledge base '{base['name']}'?"
    )
    echo(f"deleted knowledge base {base['name']}")

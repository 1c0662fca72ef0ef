"""`converge logs`: the control plane's own log and a deployment's replicas' logs, together,
interleaved by time, each line prefixed with where it came from.

Everything comes over HTTP: the control plane's log from `GET /ops/logs` (organisation admins),
each replica's from `GET /deployments/{id}/logs?replica=...`. Lines are ordered by their own
time (the `timestamp` of JSON lines, the stamp of supervisor notes); a line without one (a
native library's output, a traceback) stays right after the line before it in its own log.
Following, the lines already written come first in time order, then each new line as it arrives.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import httpx
import typer
from rich.text import Text

from converge.cli import output
from converge.cli.client import Api, ProfileOpt, api, current_profile
from converge.cli.deploy import find_deployment
from converge.cli.output import die, note
from converge.kit.observability import line_time

CONTROL_PLANE = "converge"
EARLIEST = datetime.min.replace(tzinfo=UTC)
# Following: the lines every log already holds arrive in a burst; they are sorted together once
# no log has said anything for this long (or after SETTLE_MAX_S), then lines print as they come.
SETTLE_S = 0.3
SETTLE_MAX_S = 3.0
STYLES = ("cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan", "bright_magenta")

ProjectOpt = Annotated[str, typer.Option("--project", "-p", help="Project of the deployment (name or id)")]


@dataclass(frozen=True)
class Source:
    """One log: its label in the output, and where the API serves it."""

    name: str
    path: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Line:
    source: str
    text: str
    when: datetime | None


class SourceFailed(Exception):
    def __init__(self, source: str, *, status: int, detail: str) -> None:
        super().__init__(f"{source}: {status} {detail}")
        self.source, self.status, self.detail = source, status, detail


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        return str(body.get("detail") or body.get("error", {}).get("message") or resp.text)
    except (ValueError, AttributeError):
        return resp.text


def read(http: httpx.Client, source: Source, *, follow: bool) -> Iterator[str]:
    """The lines of one log (raises SourceFailed on an error answer)."""
    params = {**source.params, "follow": follow}
    with http.stream("GET", source.path, params=params, timeout=None if follow else 60.0) as resp:
        if resp.status_code >= 400:
            resp.read()
            raise SourceFailed(source.name, status=resp.status_code, detail=_detail(resp))
        yield from resp.iter_lines()


def merge(batches: dict[str, list[str]]) -> list[Line]:
    """Every log's lines in time order; a line without a time keeps its place after the line
    before it in its own log (a log's own order is never changed among equal times)."""
    keyed: list[tuple[datetime, int, int, Line]] = []
    for order, (source, lines) in enumerate(batches.items()):
        last = EARLIEST
        for index, text in enumerate(lines):
            when = line_time(text)
            last = when or last
            keyed.append((last, order, index, Line(source, text, when)))
    keyed.sort(key=lambda k: k[:3])
    return [k[3] for k in keyed]


class Printer:
    """Prefixes each line with its log's name (padded to the longest, a colour each)."""

    def __init__(self, names: list[str], *, as_json: bool) -> None:
        self.width = max((len(n) for n in names), default=0)
        self.styles = {name: STYLES[i % len(STYLES)] for i, name in enumerate(names)}
        self.as_json = as_json

    def __call__(self, line: Line) -> None:
        if self.as_json:
            when = line.when.isoformat() if line.when is not None else None
            print(json.dumps({"source": line.source, "time": when, "line": line.text}), flush=True)
            return
        prefix = (f"{line.source:<{self.width}} | ", self.styles.get(line.source, ""))
        output.console.print(Text.assemble(prefix, line.text), soft_wrap=True, highlight=False)


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        die(f"--since must be an ISO 8601 time such as 2026-12-01T21:00:00Z, not {value!r}")
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


class SinceFilter:
    """Drops lines older than `since`; a line without a time goes with the one before it."""

    def __init__(self, since: datetime | None) -> None:
        self.since = since
        self.keep: dict[str, bool] = {}

    def __call__(self, line: Line) -> bool:
        if self.since is None:
            return True
        if line.when is not None:
            self.keep[line.source] = line.when >= self.since
        return self.keep.get(line.source, False)


def sources(
    client: Api, *, deployment: str | None, project: str, tail: int, since: str | None, control_plane: bool
) -> list[Source]:
    found: list[Source] = []
    if control_plane:
        params: dict[str, Any] = {"tail": tail, **({"since": since} if since else {})}
        found.append(Source(CONTROL_PLANE, "/ops/logs", params))
    if deployment is not None:
        d = find_deployment(client, client.project_id(project), deployment)
        replicas = [r["id"] for r in (d.get("status") or {}).get("replicas", [])]
        if not replicas:
            note(Text(f"Deployment '{d['name']}' has no replicas right now", style="yellow"))
        found += [Source(r, f"/deployments/{d['id']}/logs", {"replica": r, "tail": tail}) for r in replicas]
    return found


def _skip_or_die(failure: SourceFailed, *, others: bool) -> None:
    """A log the caller may not read: said once, and the others shown, unless it was the only one."""
    if failure.source == CONTROL_PLANE and failure.status == 403 and others:
        note(
            Text(
                "The control plane's log needs an organisation admin key: showing the replicas' logs only",
                style="yellow",
            )
        )
        return
    if others:
        note(Text(f"{failure.source}: error {failure.status}: {failure.detail}", style="yellow"))
        return
    die(Text.assemble((f"Error {failure.status}:", "red"), " ", failure.detail))


def collect(client: Api, found: list[Source]) -> dict[str, list[str]]:
    batches: dict[str, list[str]] = {}
    for source in found:
        try:
            batches[source.name] = list(read(client.http, source, follow=False))
        except SourceFailed as failure:
            _skip_or_die(failure, others=len(found) > 1)
        except httpx.ConnectError:
            client.unreachable()
    return batches


def follow_all(profile: str | None, found: list[Source], *, show: Printer, keep: SinceFilter) -> None:
    """One reader thread a log (each with its own connection), lines printed as they arrive."""
    inbox: queue.Queue[tuple[str, str | None, BaseException | None]] = queue.Queue()

    def reader(source: Source) -> None:
        http = Api(current_profile(profile)).http
        try:
            for text in read(http, source, follow=True):
                inbox.put((source.name, text, None))
        except (SourceFailed, httpx.HTTPError) as exc:
            inbox.put((source.name, None, exc))
        else:
            inbox.put((source.name, None, None))
        finally:
            http.close()

    for source in found:
        threading.Thread(target=reader, args=(source,), name=f"logs-{source.name}", daemon=True).start()
    open_logs = {s.name for s in found}
    backlog: dict[str, list[str]] = {s.name: [] for s in found}
    heard: set[str] = set()  # the logs that sent a line (or ended) so far
    settled = False
    started = time.monotonic()
    while open_logs:
        try:
            # Short waits: a ^C is seen promptly, and quiet ends the first burst.
            name, text, error = inbox.get(timeout=SETTLE_S if not settled else 1.0)
        except queue.Empty:
            name, text, error = "", None, None
        if name:
            heard.add(name)
        quiet = not name and heard >= {s.name for s in found}
        if not settled and (quiet or time.monotonic() - started > SETTLE_MAX_S):
            settled = True
            for line in merge(backlog):
                if keep(line):
                    show(line)
        if not name:
            continue
        if text is None:
            open_logs.discard(name)
            if error is not None:
                failure = (
                    error
                    if isinstance(error, SourceFailed)
                    else SourceFailed(name, status=0, detail=str(error))
                )
                _skip_or_die(failure, others=bool(open_logs) or any(backlog.values()))
            continue
        if settled:
            line = Line(name, text, line_time(text))
            if keep(line):
                show(line)
        else:
            backlog[name].append(text)
    if not settled:
        for line in merge(backlog):
            if keep(line):
                show(line)


def logs(
    *,
    deployment: Annotated[
        str | None,
        typer.Option("--deployment", "-d", help="Also the logs of this deployment's replicas (name or id)"),
    ] = None,
    project: ProjectOpt = "default",
    tail: Annotated[int, typer.Option(help="Lines from the end of each log", min=0, max=10000)] = 100,
    since: Annotated[
        str | None, typer.Option(help="Only lines written at or after this time (ISO 8601, UTC if no zone)")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming new lines")] = False,
    control_plane: Annotated[
        bool, typer.Option("--control-plane/--no-control-plane", help="Include the control plane's own log")
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object a line: source, time, line")
    ] = False,
    profile: ProfileOpt = None,
) -> None:
    """The control plane's log and a deployment's replicas' logs, interleaved by time."""
    after = _since(since)
    client = api(profile)
    found = sources(
        client, deployment=deployment, project=project, tail=tail, since=since, control_plane=control_plane
    )
    if not found:
        die("Nothing to show: name a deployment (--deployment) or include the control plane's log")
    show = Printer([s.name for s in found], as_json=as_json)
    keep = SinceFilter(after)
    try:
        if follow:
            follow_all(profile, found, show=show, keep=keep)
            return
        for line in merge(collect(client, found)):
            if keep(line):
                show(line)
    except KeyboardInterrupt:  # ^C ends a follow: not an error
        raise typer.Exit(0) from None

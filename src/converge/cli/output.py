"""What the CLI shows: the one stdout and stderr console, tables, fields, times, progress.

Results go to stdout and everything else (progress, notes, errors) to stderr, so a command's
output can be piped. Every helper looks the consoles up when it runs, so a test replaces them
once (`console`, `err`) for every command. Server-provided text is rendered as `Text`, so a `[`
in an expression, a file name or an error message is shown as written instead of being read as
rich markup.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, NoReturn

import typer
from rich.console import Console, RenderableType
from rich.live import Live
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

console = Console()
err = Console(stderr=True)


def echo(*objects: RenderableType) -> None:
    """A result, on stdout; strings are rich markup."""
    console.print(*objects)


def note(message: RenderableType) -> None:
    """Something beside the result (what was done, what to do next), on stderr."""
    err.print(message)


def die(message: str | Text, code: int = 1) -> NoReturn:
    """Say what went wrong on stderr, in red unless `message` is styled already, and exit."""
    err.print(Text(message, style="red") if isinstance(message, str) else message)
    raise typer.Exit(code)


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
    console.print(t)


def fields(rows: list[tuple[str, Any]], title: str | None = None) -> None:
    """A two-column key/value table; rows whose value is None are left out."""
    t = Table(title=title, show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for key, value in rows:
        if value is not None:
            t.add_row(key, value if isinstance(value, Text) else cell(value))
    console.print(t)


def yes_no(flag: bool) -> Text:
    """An enabled/disabled flag as a table cell: green yes or dim no."""
    return Text("yes", style="green") if flag else Text("no", style="dim")


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


# ---------------------------------------------------------------------------------------------
# Long work: always on stderr, so stdout stays the result


def transfer() -> Progress:
    """A bytes progress bar (hashing, uploading): size, speed and time left."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
    )


def busy(message: str) -> AbstractContextManager[Any]:
    """A spinner with `message` (rich markup) while the server works on one long request."""
    return err.status(message)


def live(renderable: RenderableType) -> Live:
    """A view redrawn in place on stdout, e.g. a rollout until it is ready."""
    return Live(renderable, console=console, refresh_per_second=4)

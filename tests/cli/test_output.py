"""The CLI's rendering helpers, without a server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import typer
from rich.console import Console

from converge.cli import output


def test_die_shows_its_message_literally_on_stderr_and_exits_with_the_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    err = Console(stderr=True, width=250, record=True)
    monkeypatch.setattr(output, "err", err)

    with pytest.raises(typer.Exit) as exit_:
        output.die("name must match [a-z0-9]+", code=2)

    assert exit_.value.exit_code == 2
    assert err.export_text() == "name must match [a-z0-9]+\n"


@pytest.mark.parametrize(
    ("value", "shown"),
    [(None, ""), (True, "yes"), (False, "no"), (["a", "b"], "a, b"), (3, "3"), ("[x]", "[x]")],
)
def test_a_cell_reads_as_a_person_would_write_the_value(value: object, shown: str) -> None:
    assert output.cell(value).plain == shown


@pytest.mark.parametrize(
    ("n", "shown"), [(None, None), (999, "999"), (134_515_008, "134.5M"), (2 * 10**9, "2.0B")]
)
def test_a_large_count_is_shortened_with_its_unit(n: int | None, shown: str | None) -> None:
    assert output.human_count(n) == shown


def test_when_gives_the_utc_time_and_how_long_ago() -> None:
    moment = datetime.now(UTC) - timedelta(minutes=3, seconds=5)

    shown = output.when(moment.isoformat())

    assert shown == f"{moment:%Y-%m-%d %H:%M:%S} UTC (3m ago)"
    assert output.when("not a time") == "not a time"
    assert output.when(None) is None

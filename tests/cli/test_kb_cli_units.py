"""`converge kb` helpers that need no server: which files a folder yields, and filter parsing."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from converge.cli.kb import expand, parse_filters


def test_expand_walks_folders_in_order_and_skips_what_ingestion_cannot_read(tmp_path: Path) -> None:
    (tmp_path / "docs" / "deep").mkdir(parents=True)
    for name in ("b.md", "a.PDF", "deep/c.html", "deep/notes.jsonl", "image.png", "deep/run.sh"):
        (tmp_path / "docs" / name).write_text("x")
    single = tmp_path / "one.txt"
    single.write_text("x")

    files, skipped = expand([tmp_path / "docs", single])

    docs = tmp_path / "docs"
    assert files == [docs / "a.PDF", docs / "b.md", docs / "deep/c.html", docs / "deep/notes.jsonl", single]
    assert sorted(skipped) == [docs / "deep/run.sh", docs / "image.png"]


def test_expand_refuses_a_missing_path(tmp_path: Path) -> None:
    with pytest.raises(typer.Exit):
        expand([tmp_path / "nope"])


def test_filters_take_json_values_and_fall_back_to_strings() -> None:
    assert parse_filters(["lang=en", "year=2024", "draft=false", "team=ml=ops"]) == {
        "lang": "en",
        "year": 2024,
        "draft": False,
        "team": "ml=ops",
    }
    with pytest.raises(typer.Exit):
        parse_filters(["novalue"])

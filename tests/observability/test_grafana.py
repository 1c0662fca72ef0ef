"""The typed dashboard builders: layout, ids, variables."""

from __future__ import annotations

import json

import pytest

from converge.observability.grafana import Dashboard, Kind, Panel, Row, Target, Variable, dump


def _panel(title: str, width: int = 12, expr: str = "up") -> Panel:
    return Panel(title=title, targets=(Target(expr),), width=width)


def test_panels_flow_left_to_right_wrap_and_rows_start_new_lines() -> None:
    board = Dashboard(
        uid="t",
        title="T",
        rows=(
            Row("one", (_panel("a", 8), _panel("b", 8), _panel("c", 12))),
            Row("two", (Panel(title="d", targets=(Target("up"),), kind=Kind.STAT, width=4, height=4),)),
        ),
    )
    panels = board.to_json()["panels"]
    placed = {p["title"]: (p["type"], p["gridPos"]) for p in panels}
    assert placed["one"] == ("row", {"h": 1, "w": 24, "x": 0, "y": 0})
    assert placed["a"][1] == {"h": 8, "w": 8, "x": 0, "y": 1}
    assert placed["b"][1] == {"h": 8, "w": 8, "x": 8, "y": 1}
    assert placed["c"][1] == {"h": 8, "w": 12, "x": 0, "y": 9}  # 8 + 8 + 12 > 24: wraps
    assert placed["two"][1]["y"] == 17
    assert placed["d"] == ("stat", {"h": 4, "w": 4, "x": 0, "y": 18})
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))


def test_targets_get_ref_ids_and_the_datasource_variable() -> None:
    board = Dashboard(
        uid="t", title="T", rows=(Row("r", (Panel(title="p", targets=(Target("a"), Target("b", "{{x}}"))),)),)
    )
    data = board.to_json()
    targets = data["panels"][1]["targets"]
    assert [(t["refId"], t["expr"], t["legendFormat"]) for t in targets] == [
        ("A", "a", "__auto"),
        ("B", "b", "{{x}}"),
    ]
    assert {t["datasource"]["uid"] for t in targets} == {"${datasource}"}
    assert data["templating"]["list"][0]["name"] == "datasource"


def test_a_query_using_an_undefined_variable_is_refused() -> None:
    board = Dashboard(uid="t", title="T", rows=(Row("r", (_panel("p", expr='up{job=~"$job"}'),)),))
    with pytest.raises(ValueError, match=r"undefined variables: job"):
        board.to_json()
    defined = Dashboard(
        uid="t",
        title="T",
        rows=board.rows,
        variables=(Variable(name="job", label="job", metric="up"),),
    )
    variables = defined.to_json()["templating"]["list"]
    assert variables[1]["query"]["query"] == "label_values(up, job)"


def test_a_panel_needs_targets_and_a_width_within_the_grid() -> None:
    with pytest.raises(ValueError, match="no target"):
        Panel(title="p", targets=())
    with pytest.raises(ValueError, match="width"):
        _panel("p", 25)


def test_dump_is_stable_json_with_a_trailing_newline() -> None:
    board = Dashboard(uid="t", title="T", rows=(Row("r", (_panel("p"),)),))
    text = dump(board)
    assert text.endswith("}\n")
    assert json.loads(text) == board.to_json()
    assert dump(board) == text

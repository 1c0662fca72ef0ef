"""Typed builders for Grafana dashboards (the JSON model of Grafana 10/11, schemaVersion 39).

A dashboard is rows of panels; a panel is one or more PromQL targets. Layout is computed:
panels flow left to right in a 24-column grid and wrap, each row starts on a new line. The
data source is a dashboard variable, so the JSON imports into any Grafana with a Prometheus.

    Dashboard(uid="converge-x", title="X", rows=(Row("Traffic", (Panel("Requests", (Target("..."),)),)),))
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

SCHEMA_VERSION = 39
GRID_COLUMNS = 24
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


class Kind(StrEnum):
    TIMESERIES = "timeseries"
    STAT = "stat"


class Unit(StrEnum):
    """Grafana's unit ids for the units the dashboards use."""

    NONE = "none"
    SHORT = "short"
    REQUESTS_PER_SECOND = "reqps"
    PER_SECOND = "ops"
    RATIO = "percentunit"
    SECONDS = "s"
    BYTES = "bytes"


@dataclass(frozen=True, slots=True)
class Target:
    expr: str
    legend: str = ""
    instant: bool = False  # stat panels read the last value only


@dataclass(frozen=True, slots=True)
class Threshold:
    """A colour from `value` up (the first threshold of a panel starts at minus infinity)."""

    value: float | None
    color: str


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    targets: tuple[Target, ...]
    description: str = ""
    kind: Kind = Kind.TIMESERIES
    unit: Unit = Unit.SHORT
    width: int = 12
    height: int = 8
    stacked: bool = False
    thresholds: tuple[Threshold, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.width <= GRID_COLUMNS:
            raise ValueError(f"panel {self.title!r}: width must be 1..{GRID_COLUMNS}, not {self.width}")
        if not self.targets:
            raise ValueError(f"panel {self.title!r} has no target")

    def to_json(self, *, panel_id: int, x: int, y: int) -> dict[str, Any]:
        defaults: dict[str, Any] = {"unit": self.unit.value}
        if self.minimum is not None:
            defaults["min"] = self.minimum
        if self.maximum is not None:
            defaults["max"] = self.maximum
        steps = self.thresholds or (Threshold(None, "green"),)
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": t.color, "value": None if i == 0 else t.value} for i, t in enumerate(steps)],
        }
        if self.kind is Kind.TIMESERIES:
            defaults["custom"] = {
                "drawStyle": "line",
                "fillOpacity": 10,
                "lineWidth": 1,
                "showPoints": "never",
                "spanNulls": False,
                "stacking": {"group": "A", "mode": "normal" if self.stacked else "none"},
                "thresholdsStyle": {"mode": "dashed" if self.thresholds else "off"},
            }
            options: dict[str, Any] = {
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "desc"},
            }
        else:
            options = {
                "colorMode": "value",
                "graphMode": "none",
                "justifyMode": "auto",
                "orientation": "auto",
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "textMode": "auto",
            }
        return {
            "id": panel_id,
            "type": self.kind.value,
            "title": self.title,
            "description": self.description,
            "datasource": DATASOURCE,
            "gridPos": {"h": self.height, "w": self.width, "x": x, "y": y},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": options,
            "targets": [
                {
                    "datasource": DATASOURCE,
                    "expr": t.expr,
                    "legendFormat": t.legend or "__auto",
                    "instant": t.instant,
                    "range": not t.instant,
                    "refId": chr(ord("A") + i),
                }
                for i, t in enumerate(self.targets)
            ],
        }


@dataclass(frozen=True, slots=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True, slots=True)
class Variable:
    """A query variable: the values of `label` on `metric` (`label_values(metric, label)`)."""

    name: str
    label: str
    metric: str
    title: str = ""
    multi: bool = True

    def to_json(self) -> dict[str, Any]:
        query = f"label_values({self.metric}, {self.label})"
        return {
            "name": self.name,
            "label": self.title or self.name,
            "type": "query",
            "datasource": DATASOURCE,
            "definition": query,
            "query": {"query": query, "refId": f"{self.name}-values"},
            "refresh": 2,  # on time range change: new deployments appear
            "includeAll": self.multi,
            "allValue": ".*" if self.multi else None,
            "multi": self.multi,
            "current": {},
            "options": [],
            "regex": "",
            "sort": 1,
            "hide": 0,
        }


@dataclass(frozen=True, slots=True)
class Dashboard:
    uid: str
    title: str
    rows: tuple[Row, ...]
    description: str = ""
    variables: tuple[Variable, ...] = ()
    tags: tuple[str, ...] = ("converge",)
    refresh: str = "30s"
    time_from: str = "now-3h"

    def panels(self) -> Iterator[Panel]:
        for row in self.rows:
            yield from row.panels

    def queries(self) -> Iterator[tuple[str, str]]:
        """(panel title, PromQL) of every target, variables left in."""
        for panel in self.panels():
            for target in panel.targets:
                yield panel.title, target.expr

    def variable_names(self) -> set[str]:
        return {"datasource", *(v.name for v in self.variables)}

    def to_json(self) -> dict[str, Any]:
        used = {name for _, expr in self.queries() for name in _VARIABLE.findall(expr)}
        unknown = sorted(n for n in used - self.variable_names() if not n.startswith("__"))
        if unknown:
            raise ValueError(f"dashboard {self.uid!r} queries undefined variables: {', '.join(unknown)}")
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": list(self.tags),
            "editable": True,
            "graphTooltip": 1,  # shared crosshair
            "refresh": self.refresh,
            "schemaVersion": SCHEMA_VERSION,
            "time": {"from": self.time_from, "to": "now"},
            "timezone": "browser",
            "version": 1,
            # A menu of the other Converge dashboards (found by their tag).
            "links": [{"type": "dashboards", "tags": ["converge"], "asDropdown": True, "title": "Converge"}],
            "templating": {"list": [_datasource_variable(), *(v.to_json() for v in self.variables)]},
            "annotations": {"list": []},
            "panels": _layout(self.rows),
        }


def _datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "options": [],
        "regex": "",
        "refresh": 1,
        "hide": 0,
    }


def _layout(rows: tuple[Row, ...]) -> list[dict[str, Any]]:
    """Grafana's flat panel list: a row header, then its panels flowing left to right."""
    out: list[dict[str, Any]] = []
    y, next_id = 0, 1
    for row in rows:
        out.append(
            {
                "id": next_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": GRID_COLUMNS, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id, y = next_id + 1, y + 1
        x, line_height = 0, 0
        for panel in row.panels:
            if x + panel.width > GRID_COLUMNS:
                x, y, line_height = 0, y + line_height, 0
            out.append(panel.to_json(panel_id=next_id, x=x, y=y))
            next_id, x, line_height = next_id + 1, x + panel.width, max(line_height, panel.height)
        y += line_height
    return out


def dump(dashboard: Dashboard) -> str:
    """The dashboard as the JSON file checked in: stable key order, one trailing newline."""
    return json.dumps(dashboard.to_json(), indent=2, sort_keys=True) + "\n"

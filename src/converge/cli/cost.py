"""`converge cost ...`: estimates with their working, and the price catalogue."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.text import Text

from converge.cli.client import ProfileOpt, api
from converge.cli.output import echo, fields, note, table

cost = typer.Typer(
    help="Cost: estimates from the model's own facts, and the price catalogue.", no_args_is_help=True
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the raw answer")]
GB = 10**9


def _money(value: float, currency: str) -> str:
    """Cents from one unit up; below that, the digits a small unit price needs (0.005, 0.557143)."""
    return f"{value:,.2f} {currency}" if value >= 1 or value == 0 else f"{value:.6g} {currency}"


def _amount(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / GB:,.2f} GB" if value >= GB / 100 else f"{value:,.0f} bytes"
    return f"{value:,g} {unit}"


def _raw(body: Any) -> None:
    typer.echo(json.dumps(body, indent=2))  # plain: no rich wrapping or markup in what a script reads


@cost.command("estimate")
def cost_estimate(
    model: Annotated[
        str, typer.Argument(help="MODEL or MODEL:VERSION from the library (newest approved if no version)")
    ],
    *,
    context: Annotated[
        int | None, typer.Option(help="Tokens of context per request (default: the model's)")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight, over all replicas")] = 1,
    gpu: Annotated[
        str | None, typer.Option("--gpu", help="A GPU type, e.g. H100 (default: the cheapest that fits)")
    ] = None,
    mig: Annotated[str | None, typer.Option("--mig", help="A MIG profile, e.g. 1g.10gb")] = None,
    gpus: Annotated[int | None, typer.Option(help="A fixed number of GPUs (with --gpu)")] = None,
    zone: Annotated[str | None, typer.Option(help="Price zone (default: the catalogue's)")] = None,
    replicas: Annotated[int | None, typer.Option(help="Replicas (default 1)")] = None,
    spot: Annotated[bool, typer.Option("--spot", help="Spot prices instead of on-demand")] = False,
    cpu_only: Annotated[
        bool, typer.Option("--cpu-only", help="Run on CPU: cores and memory, no GPU")
    ] = False,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Hourly and monthly cost of running MODEL, with the memory maths that chose its GPU."""
    body: dict[str, Any] = {"model": model, "concurrency": concurrency, "spot": spot, "cpu_only": cpu_only}
    optional = {
        "context": context,
        "gpu_type": gpu,
        "mig_profile": mig,
        "gpus": gpus,
        "zone": zone,
        "replicas": replicas,
    }
    body |= {key: value for key, value in optional.items() if value is not None}
    result = api(profile).call("POST", "/cost/estimate", json=body)
    if as_json:
        _raw(result)
        return
    show_estimate(result)


def show_estimate(e: dict[str, Any]) -> None:
    currency, subject, gpu = e["currency"], e["subject"], e["per_replica"]["gpu"]
    device = f"{gpu['count']} x {gpu['device']}" if gpu else "CPU only"
    fields(
        [
            ("model", f"{subject['model']}:{subject['version']}"),
            ("deployment", subject.get("deployment")),
            ("zone", f"{e['zone']} ({e['pricing'].replace('_', '-')}, catalogue v{e['catalogue_version']})"),
            ("context", f"{e['context']:,} tokens" if e["context"] else None),
            ("concurrency", e["concurrency"]),
            ("replicas", e["replicas"]),
            ("device", f"{device} per replica"),
        ]
    )
    if e["working"]:
        rows = [
            {"step": s["name"], "how": Text(s["expression"]), "value": _amount(s["value"], s["unit"])}
            for s in e["working"]
        ]
        table(rows, ["step", "how", "value"], title="Memory fit")
    lines = [
        {
            "item": line["item"],
            "quantity": f"{line['quantity']:,.4g} {line['unit']}",
            "unit price": _money(line["unit_price"], currency),
            "per hour": _money(line["hourly"], currency),
            "per month": _money(line["monthly"], currency),
        }
        for line in e["lines"]
    ]
    lines.append(
        {
            "item": "Total",
            "per hour": _money(e["hourly"], currency),
            "per month": _money(e["monthly"], currency),
        }
    )
    table(lines, ["item", "quantity", "unit price", "per hour", "per month"], title="Cost")
    if e["alternatives"]:
        rows = [
            {"device": f"{a['count']} x {a['device']}", "GPU per hour": _money(a["hourly"], currency)}
            for a in e["alternatives"]
        ]
        table(rows, ["device", "GPU per hour"], title="Also fits")
    for line in e["notes"]:
        note(Text(line))
    for missing in e["missing"]:
        note(Text(f"missing: {missing['fact']} ({missing['needed_for']})"))


@cost.command("prices")
def cost_prices(
    *,
    version: Annotated[int | None, typer.Option(help="An earlier version of the catalogue")] = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """The price catalogue in force (or an earlier version): GPUs, CPU, memory and storage per zone."""
    params = {"version": version} if version is not None else {}
    body = api(profile).call("GET", "/cost/prices", params=params)
    if as_json:
        _raw(body)
        return
    catalogue = body["catalogue"]
    currency = catalogue["currency"]
    note(Text(f"Price catalogue v{body['version']} by {body['created_by']}: {body['note']}"))
    types = catalogue["gpu_types"]
    for name, zone in catalogue["zones"].items():
        default = " (default)" if name == catalogue["default_zone"] else ""
        rows = [
            {
                "resource": f"GPU {gpu} ({types[gpu]['memory_gb']:g} GB)",
                "unit": "GPU-hour",
                "on-demand": _money(price["on_demand"], currency),
                "spot": _money(price["spot"], currency),
                "MIG profiles": ", ".join(types[gpu].get("mig_profiles") or {}),
            }
            for gpu, price in zone["gpus"].items()
        ]
        for resource, unit, key in (
            ("CPU", "core-hour", "cpu_core_hour"),
            ("Memory", "GiB-hour", "memory_gib_hour"),
        ):
            price = zone[key]
            rows.append(
                {
                    "resource": resource,
                    "unit": unit,
                    "on-demand": _money(price["on_demand"], currency),
                    "spot": _money(price["spot"], currency),
                }
            )
        rows.append(
            {
                "resource": "Storage",
                "unit": "GiB-month",
                "on-demand": _money(zone["storage_gib_month"], currency),
            }
        )
        table(rows, ["resource", "unit", "on-demand", "spot", "MIG profiles"], title=f"Zone {name}{default}")
    echo(Text(f"A month is {catalogue['hours_per_month']:g} hours."))


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.2f} h" if seconds >= 36 else f"{seconds:,.0f} s"


@cost.command("report")
def cost_report(
    *,
    project: Annotated[
        str | None, typer.Option(help="Project id or name (admins may leave it out for every project)")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="First UTC day, YYYY-MM-DD (default: 29 days back)")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Last UTC day, YYYY-MM-DD (default: today)")] = None,
    by: Annotated[str, typer.Option("--by", help="deployment | day (one row per deployment and day)")] = (
        "deployment"
    ),
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Measured cost: replica time x the catalogue's prices, tokens metered, cost per million tokens."""
    params = {"project": project, "since": since, "until": until, "group_by": by}
    body = api(profile).call(
        "GET", "/cost/report", params={key: value for key, value in params.items() if value is not None}
    )
    if as_json:
        _raw(body)
        return
    show_report(body)


def show_report(body: dict[str, Any]) -> None:
    currency, by_day = body["currency"], body["group_by"] == "day"

    def row(r: dict[str, Any], label: str) -> dict[str, Any]:
        per_m = r["cost_per_million_tokens"]
        return {
            "day": r.get("day") or "",
            "deployment": label,
            "replica time": _hours(r["replica_seconds"]),
            "per replica-hour": "" if r["price_per_hour"] is None else _money(r["price_per_hour"], currency),
            "cost": _money(r["cost"], currency),
            "requests": f"{r['requests']:,}",
            "tokens": f"{r['total_tokens']:,}",
            "per 1M tokens": "-" if per_m is None else _money(per_m, currency),
        }

    rows = [row(r, r["deployment"] or f"{r['deployment_id']} (deleted)") for r in body["data"]]
    rows.append(row(body["totals"], "Total"))
    columns = [
        "deployment",
        "replica time",
        "per replica-hour",
        "cost",
        "requests",
        "tokens",
        "per 1M tokens",
    ]
    table(rows, ["day", *columns] if by_day else columns, title=f"Cost {body['since']} .. {body['until']}")
    for line in sorted({n for r in body["data"] for n in r["notes"]}):
        note(Text(line))


@cost.command("budget")
def cost_budget(
    project: Annotated[str, typer.Argument(help="Project id or name")],
    *,
    monthly: Annotated[
        float | None,
        typer.Option(help="Set the budget per calendar month (UTC), in the catalogue's currency"),
    ] = None,
    enforce: Annotated[
        bool | None,
        typer.Option("--enforce/--no-enforce", help="Refuse the project's gateway requests once it is spent"),
    ] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Remove the budget")] = False,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Show a project's money budget and this month's measured cost, or set or remove it."""
    client, path = api(profile), f"/cost/budgets/{project}"
    if remove:
        client.call("DELETE", path)
        note(Text(f"Budget of project {project} removed"))
        return
    if monthly is not None or enforce is not None:
        current = {} if monthly is not None else client.call("GET", path)
        body = {
            "monthly": monthly if monthly is not None else current["monthly"],
            "enforce": bool(enforce) if enforce is not None else bool(current.get("enforce", False)),
        }
        result = client.call("PUT", path, json=body)
    else:
        result = client.call("GET", path)
    if as_json:
        _raw(result)
        return
    currency = result["currency"]
    fields(
        [
            ("month", result["month"]),
            ("budget", _money(result["monthly"], currency)),
            ("spent", f"{_money(result['spent'], currency)} ({result['percent']:g} %)"),
            ("alerted at", f"{result['alerted']} %" if result["alerted"] else "-"),
            ("enforce", "yes: the gateway refuses once spent" if result["enforce"] else "no: alerts only"),
            ("refusing", "YES" if result["refusing"] else "no"),
        ]
    )


@cost.command("recommendations")
def cost_recommendations(
    *,
    project: Annotated[
        str | None, typer.Option(help="Project id or name (admins may leave it out for every project)")
    ] = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Where deployments could cost less (right-size, scale to zero), with why and the numbers."""
    params = {"project": project} if project else {}
    body = api(profile).call("GET", "/cost/recommendations", params=params)
    if as_json:
        _raw(body)
        return
    currency = body["currency"]
    rows = [
        {
            "deployment": r["deployment"],
            "advice": r["kind"].replace("_", " "),
            "saves a month": _money(r["monthly_savings"], currency),
            "why": Text(r["why"]),
        }
        for r in body["data"]
    ]
    if rows:
        table(rows, ["deployment", "advice", "saves a month", "why"], title="Recommendations")
    else:
        note(Text(f"Nothing to advise from the last {body['window_days']} days"))
    for line in body["not_checked"]:
        note(Text(f"not checked: {line}"))

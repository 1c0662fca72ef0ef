"""`converge render platform` prints what `kubectl apply -f -` takes, and `converge serve` runs
roles; neither needs a server (these tests start none)."""

from __future__ import annotations

import functools
import json

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils
from typer.testing import CliRunner, Result

from converge.cli.main import app as cli_app
from converge.kit.roles import ROLE_HELP, Role
from converge.runtime.kubernetes.platform import PlatformSpec, render_platform
from converge.runtime.kubernetes.specs import ClusterProfile

OPTIONS = [
    "--namespace",
    "ai-prod",
    "--image",
    "registry.example.com/converge/converge:1.2.3",
    "--replicas",
    "worker=3",
    "--replicas",
    "api=1",
    "--set",
    "CONVERGE_LIBRARY__ARTIFACT_STORE_URL=s3://converge-artifacts/library",
]
EXPECTED = render_platform(
    PlatformSpec(
        cluster=ClusterProfile(system_namespace="ai-prod"),
        image="registry.example.com/converge/converge:1.2.3",
        replicas={Role.WORKER: 3, Role.API: 1},
        settings={"CONVERGE_LIBRARY__ARTIFACT_STORE_URL": "s3://converge-artifacts/library"},
    )
)


def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
    # Wide: rich would fold a help line that a test looks for.
    return CliRunner().invoke(cli_app, list(args), env={"COLUMNS": "250", "NO_COLOR": "1", **(env or {})})


def test_render_platform_prints_yaml_documents_that_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    # kubernetes-validate parses its schema file on every call; once per test is enough here.
    monkeypatch.setattr(
        kv_utils, "schema_contents", functools.lru_cache(maxsize=None)(kv_utils.schema_contents)
    )
    result = run("render", "platform", *OPTIONS)
    assert result.exit_code == 0, result.output
    documents = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
    assert documents == EXPECTED
    assert "&id" not in result.stdout  # plain documents, no YAML anchors
    for document in documents:
        kubernetes_validate.validate(document, "1.33", strict=True)


def test_render_platform_as_json_is_a_list() -> None:
    result = run("render", "platform", *OPTIONS, "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"apiVersion": "v1", "kind": "List", "items": EXPECTED}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "scheduler=2"], "unknown role 'scheduler'"),
        (["--replicas", "api=two"], "whole number"),
        (["--replicas", "api"], "KEY=VALUE"),
        (["--set", "DATABASE_URL=x"], "CONVERGE_"),
        (["--namespace", "Converge"], "DNS label"),
    ],
)
def test_render_platform_says_what_is_wrong(args: list[str], message: str) -> None:
    result = run("render", "platform", *args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_serve_help_lists_the_roles() -> None:
    result = run("serve", "--help")
    assert result.exit_code == 0
    for role in Role:
        assert f"{role.value}: {ROLE_HELP[role][:40]}" in " ".join(result.output.split())


def test_serve_refuses_an_unknown_role() -> None:
    result = run("serve", "scheduler")
    assert result.exit_code == 2 and "scheduler" in result.output


def test_serving_some_roles_needs_a_shared_database() -> None:
    result = run("serve", "gateway", env={"CONVERGE_DATABASE_URL": ""})
    assert result.exit_code == 2
    assert "CONVERGE_DATABASE_URL" in result.output

"""config.py's `runtime` settings: CONVERGE_RUNTIME__BACKEND picks where model servers run, the
Kubernetes backend's settings nest under CONVERGE_RUNTIME__KUBERNETES__*, a wrong value is refused
naming what is allowed, and create_app's lifespan builds the backend they name."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from converge.app import _runtime
from converge.config import Settings
from converge.runtime.kubernetes.backend import KubernetesBackend
from converge.runtime.kubernetes.config import KServeMode
from converge.runtime.local import LocalBackend
from converge.runtime.local.sandbox import Sandbox


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CONVERGE_"):
            monkeypatch.delenv(name)


def test_the_local_runtime_is_the_default() -> None:
    settings = Settings()

    assert settings.runtime.backend == "local"
    assert settings.runtime.kubernetes.kserve is KServeMode.AUTO


def test_the_kubernetes_runtime_and_its_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONVERGE_RUNTIME__BACKEND", "kubernetes")
    monkeypatch.setenv("CONVERGE_RUNTIME__KUBERNETES__KSERVE", "on")
    monkeypatch.setenv("CONVERGE_RUNTIME__KUBERNETES__NAMESPACE_PREFIX", "ai-")
    monkeypatch.setenv("CONVERGE_RUNTIME__KUBERNETES__CACHE_STORAGE_CLASS", "cephfs")
    monkeypatch.setenv("CONVERGE_RUNTIME__KUBERNETES__IMAGES__VLLM", "registry.local/vllm:1")

    kube = Settings().runtime.kubernetes

    assert Settings().runtime.backend == "kubernetes"
    assert (kube.kserve, kube.namespace_prefix, kube.cache_storage_class) == (KServeMode.ON, "ai-", "cephfs")
    assert kube.images.resolve().vllm == "registry.local/vllm:1"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("CONVERGE_RUNTIME__BACKEND", "k8s", "'local' or 'kubernetes'"),
        ("CONVERGE_RUNTIME__KUBERNETES__KSERVE", "maybe", "'auto', 'on' or 'off'"),
    ],
)
def test_a_wrong_value_is_refused_naming_the_setting_and_the_choices(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    monkeypatch.setenv(name, value)

    with pytest.raises(ValidationError) as caught:
        Settings()

    message = str(caught.value)
    assert "runtime." in message and says in message


def test_the_app_builds_the_backend_the_settings_name(tmp_path) -> None:
    local = _runtime(Settings(data_dir=tmp_path), sandbox=Sandbox(), sessions=lambda: None)  # type: ignore[arg-type,return-value]
    cluster = _runtime(
        Settings(data_dir=tmp_path, runtime={"backend": "kubernetes", "kubernetes": {"kserve": "off"}}),
        sandbox=Sandbox(),
        sessions=lambda: None,  # type: ignore[arg-type,return-value]
    )

    assert isinstance(local, LocalBackend)
    assert isinstance(cluster, KubernetesBackend) and cluster.config.kserve is KServeMode.OFF
    assert cluster.artifact_path(sha256="sha256:" + "AB" * 32) == "/models/" + "ab" * 32
    assert local.artifact_path(sha256="ab" * 32) is None  # the controller fetches a local copy

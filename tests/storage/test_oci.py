from __future__ import annotations

import os
import uuid
from pathlib import Path

import oras.client
import pytest

from converge.storage.oci import InvalidReference, OciClient, OciError, OciRef


@pytest.fixture
def repo(oci_registry: str) -> str:
    # A repository per test, so tag listings do not depend on test order.
    return f"oci://{oci_registry}/models/smollm-{uuid.uuid4().hex[:8]}"


MODEL_BYTES = b"GGUF\x03\x00\x00\x00" + os.urandom(256 * 1024)


def write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


async def test_pushed_model_can_be_listed_and_pulled_back(repo: str, tmp_path: Path) -> None:
    client = OciClient()

    digest = await client.push(f"{repo}:v1", [write_file(tmp_path / "src" / "smollm.gguf", MODEL_BYTES)])
    pulled = await client.pull(f"{repo}:v1", tmp_path / "out")

    assert await client.list_tags(repo) == ["v1"]
    assert pulled == [tmp_path / "out" / "smollm.gguf"]
    assert pulled[0].read_bytes() == MODEL_BYTES
    assert await client.manifest_digest(f"{repo}:v1") == digest
    assert list((tmp_path / "out").iterdir()) == pulled  # no partial downloads left behind


async def test_a_second_tag_appears_in_the_listing(repo: str, tmp_path: Path) -> None:
    client = OciClient()
    await client.push(f"{repo}:v1", [write_file(tmp_path / "v1" / "smollm.gguf", MODEL_BYTES)])

    await client.push(f"{repo}:v2", [write_file(tmp_path / "v2" / "smollm.gguf", MODEL_BYTES + b"v2")])

    assert sorted(await client.list_tags(repo)) == ["v1", "v2"]
    assert await client.manifest_digest(f"{repo}:v1") != await client.manifest_digest(f"{repo}:v2")


async def test_pull_by_digest_gets_exactly_that_manifest(repo: str, tmp_path: Path) -> None:
    client = OciClient()
    digest = await client.push(f"{repo}:v1", [write_file(tmp_path / "a" / "smollm.gguf", MODEL_BYTES)])
    await client.push(f"{repo}:v1", [write_file(tmp_path / "b" / "smollm.gguf", b"retagged")])

    pulled = await client.pull(f"{repo}@{digest}", tmp_path / "out")

    assert pulled[0].read_bytes() == MODEL_BYTES


async def test_directory_layer_pushed_by_oras_is_unpacked(repo: str, tmp_path: Path) -> None:
    model = write_file(tmp_path / "model" / "weights" / "part-1.safetensors", b"tensor bytes").parents[1]
    ref = OciRef.parse(f"{repo}:dir")
    # Pushed the way the oras CLI pushes a folder: one tar+gzip layer titled with its name.
    oras.client.OrasClient(hostname=ref.registry, insecure=True).push(
        target=ref.target, files=[str(model)], disable_path_validation=True, quiet=True
    )

    pulled = await OciClient().pull(ref, tmp_path / "out")

    assert pulled == [tmp_path / "out" / "model"]
    assert (pulled[0] / "weights" / "part-1.safetensors").read_bytes() == b"tensor bytes"


async def test_missing_tag_is_an_oci_error(repo: str, tmp_path: Path) -> None:
    with pytest.raises(OciError):
        await OciClient().manifest_digest(f"{repo}:absent")


async def test_only_regular_files_with_distinct_names_are_pushed(repo: str, tmp_path: Path) -> None:
    model = write_file(tmp_path / "a" / "smollm.gguf", MODEL_BYTES)
    twin = write_file(tmp_path / "b" / "smollm.gguf", b"x")
    with pytest.raises(OciError, match="distinct names"):
        await OciClient().push(f"{repo}:v1", [model, twin])
    with pytest.raises(OciError, match="regular files"):
        await OciClient().push(f"{repo}:v1", [tmp_path])


def test_reference_parsing() -> None:
    ref = OciRef.parse("oci://127.0.0.1:5000/models/smollm:v1")
    assert (ref.registry, ref.repository) == ("127.0.0.1:5000", "models/smollm")
    assert (ref.tag, ref.digest) == ("v1", None)
    assert ref.target == "127.0.0.1:5000/models/smollm:v1"
    assert str(ref) == "oci://127.0.0.1:5000/models/smollm:v1"
    assert OciRef.parse("registry.example.com/smollm").tag == "latest"
    pinned = OciRef.parse(f"localhost:5000/models/smollm@sha256:{'a' * 64}")
    assert pinned.digest == f"sha256:{'a' * 64}" and pinned.target.endswith(f"@sha256:{'a' * 64}")
    assert ref.with_tag("v2").target == "127.0.0.1:5000/models/smollm:v2"


@pytest.mark.parametrize(
    "bad",
    [
        "models/smollm:v1",  # no registry host: would silently mean Docker Hub
        "127.0.0.1:5000/Models/smollm:v1",  # upper case is not allowed in repositories
        "127.0.0.1:5000/models/smollm:bad/tag",
        "127.0.0.1:5000/models/smollm@md5:abc",
        "127.0.0.1:5000/",
    ],
)
def test_malformed_references_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidReference):
        OciRef.parse(bad)

"""The build Job's steps as its containers run them: the args `render_build` renders, on a real
(tiny) GGUF in a real artifact store; each step ends with one JSON line and exits non-zero with
a message a person can act on."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from aiohttp import web

from converge.runtime.base import ServerKind
from converge.runtime.kubernetes import pods
from converge.runtime.kubernetes.manifests import render_build
from converge.runtime.kubernetes.specs import Artifact, BuildJob, ClusterProfile, ProjectRef
from converge.storage.artifacts import ArtifactStore
from converge.workers import steps

PROJECT = ProjectRef(project_id=uuid.UUID("11111111-2222-3333-4444-555555555555"), name="team-a")


def tiny_gguf(path: Path, marker: str) -> Path:
    """A real (tiny) llama GGUF; `marker` makes its bytes, and so its digest, unique."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(marker)
    writer.add_context_length(256)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class RunsShell:
    """Unpickling this would run a shell command; the test only ever pickles it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


@pytest.fixture
async def stored(tmp_path: Path) -> tuple[ArtifactStore, Path, str]:
    """A local artifact store holding a tiny GGUF: (store, its root, the digest)."""
    root = tmp_path / "store"
    store = ArtifactStore.local(root)
    blob = await store.put_file(tiny_gguf(tmp_path / "model.gguf", uuid.uuid4().hex))
    return store, root, blob.sha256


def job_args(root: Path, sha256: str, *, fmt: str = "gguf") -> dict[str, list[str]]:
    """Each step container's args as `render_build` renders them for this store."""
    build = BuildJob(
        build_id=uuid.uuid4(),
        project=PROJECT,
        model_name="tiny",
        version="v1",
        server=ServerKind.LLAMA_CPP,
        profile="cpu",
        artifact=Artifact.in_store(base_uri=f"file://{root}", sha256=sha256, format=fmt),
    )
    spec = render_build(build, cluster=ClusterProfile())["spec"]["template"]["spec"]
    containers = [*spec["initContainers"], *spec["containers"]]
    return {c["name"]: c["args"] for c in containers if c["command"] == list(pods.STEP_COMMAND)}


def at(args: list[str], cache: Path) -> list[str]:
    """The rendered args with the pod's mount points moved to the test's folder."""
    return [a.replace(pods.CACHE_DIR, str(cache)).replace(pods.MODELS_DIR, str(cache)) for a in args]


def last_json(text: str) -> dict[str, Any]:
    return json.loads(text.strip().splitlines()[-1])


def run_step(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any], str]:
    code = steps.main(args)
    out, err = capsys.readouterr()
    return code, last_json(err if code else out), out + err


def test_the_job_runs_every_step_this_command_has() -> None:
    args = job_args(Path("/srv/store"), "ab" * 32)
    assert set(args) == {"fetch", "verify", "scan", "benchmark"}
    for name, argv in args.items():
        assert argv[0] == name
        steps.parser().parse_args(argv)  # every rendered arg is one the step takes


def test_help_names_the_steps(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        steps.main(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for name in ("fetch", "verify", "scan", "benchmark", "--results"):
        assert name in help_text


def test_fetch_fills_the_cache_as_the_job_renders_it(
    stored: tuple[ArtifactStore, Path, str], tmp_path: Path
) -> None:
    """The real entry point, as the container's command runs it."""
    _, root, sha = stored
    cache = tmp_path / "cache"
    cache.mkdir()
    argv = at(job_args(root, sha)["fetch"], cache)
    proc = subprocess.run(
        [sys.executable, "-m", "converge.workers.steps", *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    result = last_json(proc.stdout)
    assert result["step"] == "fetch" and result["ok"] is True
    assert result["path"] == str(cache / sha) and result["reused"] is False
    assert (cache / sha).read_bytes() == (root / ArtifactStore.object_key(sha)).read_bytes()


async def test_a_cached_copy_is_reused_and_a_changed_one_fetched_again(
    stored: tuple[ArtifactStore, Path, str], tmp_path: Path
) -> None:
    _, root, sha = stored
    cache = tmp_path / "cache"
    uri = Artifact.in_store(base_uri=f"file://{root}", sha256=sha, format="gguf").uri
    first = await steps.fetch(uri=uri, sha256=sha, cache_dir=cache)
    again = await steps.fetch(uri=uri, sha256=sha, cache_dir=cache)
    assert (first["reused"], again["reused"]) == (False, True)
    with (cache / sha).open("ab") as f:
        f.write(b"tampered")
    healed = await steps.fetch(uri=uri, sha256=sha, cache_dir=cache)
    assert healed["reused"] is False
    assert (await steps.verify(sha256=sha, path=cache / sha))["sha256"] == sha


def test_verify_passes_the_fetched_copy_and_fails_a_tampered_one(
    stored: tuple[ArtifactStore, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, root, sha = stored
    cache = tmp_path / "cache"
    args = job_args(root, sha)
    assert run_step(at(args["fetch"], cache), capsys)[0] == 0
    code, result, _ = run_step(at(args["verify"], cache), capsys)
    assert (code, result["ok"], result["sha256"]) == (0, True, sha)

    with (cache / sha).open("r+b") as f:  # one byte changed behind the fetch's back
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    results = tmp_path / "termination-log"
    code, result, _ = run_step([*at(args["verify"], cache), "--results", str(results)], capsys)
    assert code == steps.EXIT_FAILED
    assert result["ok"] is False and result["step"] == "verify"
    assert "is not the approved artifact: sha256 mismatch: expected " + sha in result["error"]
    assert json.loads(results.read_text()) == result  # the termination message says the same


def test_verify_of_a_missing_copy_says_the_fetch_did_not_fill_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result, _ = run_step(["verify", "--sha256", "cd" * 32, "--path", str(tmp_path / "none")], capsys)
    assert code == steps.EXIT_FAILED
    assert "the fetch step did not put" in result["error"]


def test_fetch_of_an_artifact_the_store_lacks_fails_clearly(
    stored: tuple[ArtifactStore, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, root, _ = stored
    missing = "ef" * 32
    uri = Artifact.in_store(base_uri=f"file://{root}", sha256=missing, format="gguf").uri
    argv = ["fetch", "--uri", uri, "--sha256", missing, "--cache-dir", str(tmp_path / "cache")]
    code, result, _ = run_step(argv, capsys)
    assert code == steps.EXIT_FAILED
    assert result["error"] == f"the artifact store has no artifact {missing} ({uri})"
    code, result, _ = run_step([*argv[:4], "ab" * 32, *argv[5:]], capsys)  # the URI of another digest
    assert code == steps.EXIT_FAILED and "is not the content address of" in result["error"]


async def test_a_folder_artifact_is_fetched_and_verified_by_its_archive_digest(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ArtifactStore.local(root)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "sub" / "weights.bin").write_bytes(os.urandom(4096))
    sha = (await store.put_directory(folder)).sha256
    uri = Artifact.in_store(base_uri=f"file://{root}", sha256=sha, format="hf").uri
    fetched = await steps.fetch(uri=uri, sha256=sha, cache_dir=tmp_path / "cache")
    assert fetched["directory"] is True
    assert (await steps.verify(sha256=sha, path=Path(fetched["path"])))["sha256"] == sha
    (Path(fetched["path"]) / "sub" / "weights.bin").write_bytes(b"changed")
    with pytest.raises(steps.StepFailed, match="sha256 mismatch"):
        await steps.verify(sha256=sha, path=Path(fetched["path"]))


def test_scan_passes_a_gguf_and_refuses_a_pickle_that_runs_a_shell(
    stored: tuple[ArtifactStore, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, root, sha = stored
    cache = tmp_path / "cache"
    args = job_args(root, sha)
    assert run_step(at(args["fetch"], cache), capsys)[0] == 0
    code, result, _ = run_step(at(args["scan"], cache), capsys)
    assert code == 0, result
    assert result["status"] == "not_applicable" and result["inspected_format"] == "gguf"

    hostile = tmp_path / "model.pkl"
    hostile.write_bytes(pickle.dumps(RunsShell(), protocol=4))
    code, result, _ = run_step(["scan", "--format", "pickle", "--path", str(hostile)], capsys)
    assert code == steps.EXIT_FAILED
    assert result["error"].startswith("the pickle artifact is unsafe: model.pkl: ")
    assert "os" in result["error"] or "posix" in result["error"]


@pytest.fixture
async def embeddings_server() -> Any:
    """An OpenAI-style embeddings server (what the smoke-load sidecar answers on)."""
    ready = {"ok": True}

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200 if ready["ok"] else 503)

    async def embed(request: web.Request) -> web.Response:
        body = await request.json()
        data = [{"index": i, "embedding": [0.1, 0.2]} for i, _ in enumerate(body["input"])]
        return web.json_response({"data": data, "model": body["model"]})

    app = web.Application()
    app.router.add_get("/health/ready", health)
    app.router.add_post("/v1/embeddings", embed)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", ready
    await runner.cleanup()


async def test_benchmark_writes_its_figures_to_the_termination_message(
    embeddings_server: Any, tmp_path: Path
) -> None:
    base_url, _ = embeddings_server
    results = tmp_path / "termination-log"
    figures = await steps.benchmark(
        server="embeddings", model_name="minilm", base_url=base_url, inputs=None, ready_timeout_s=5
    )
    assert set(figures["results"]) == {
        "texts_per_s", "batch", "texts_per_s_c1", "texts_per_s_c16", "latency_ms_p50", "latency_ms_p95"
    }  # fmt: skip
    # The whole command, as the container runs it (in a thread: the server is on this loop).
    argv = [
        "benchmark", "--server", "embeddings", "--model-name", "minilm",
        "--base-url", base_url, "--results", str(results),
    ]  # fmt: skip
    code = await asyncio.to_thread(steps.main, argv)
    assert code == 0
    written = json.loads(results.read_text())
    assert written["step"] == "benchmark" and written["results"]["batch"] == 16
    assert len(results.read_bytes()) < 4096  # what a termination message can hold


async def test_benchmark_of_a_server_that_is_not_ready_fails_clearly(embeddings_server: Any) -> None:
    base_url, ready = embeddings_server
    ready["ok"] = False
    with pytest.raises(steps.StepFailed, match=r"server at .* was not ready within 1s"):
        await steps.benchmark(
            server="embeddings", model_name="minilm", base_url=base_url, inputs=None, ready_timeout_s=1
        )

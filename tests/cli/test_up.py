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


def _env(data_dir: Path, port: int) -> dict[str, str]:
    env = {
        **os.environ,
        "CONVERGE_DATA_DIR": str(data_dir),
        "CONVERGE_PORT": str(port),
        "CONVERGE_BOOTSTRAP_TOKEN": BOOTSTRAP,
        "CONVERGE_RUN_WORKERS": "false",
        "CONVERGE_LIBRARY__SEED_CATALOGUE": "false",
        "CONVERGE_DEPLOY_DEFAULTS": "false",
    }
    env.pop("CONVERGE_DATABASE_URL", None)
    return env


def _up(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """`converge up`, once it answers /readiness."""
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "converge"), "up"],
        env=_env(data_dir, port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readiness", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("converge up did not become ready")
        time.sleep(0.3)


def _stop_and_expect_no_postgres(proc: subprocess.Popen[bytes], data_dir: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != -signal.SIGTERM  # exited, not killed by the signal
    deadline = time.monotonic() + 15
    while _postgres_of(data_dir):
        assert time.monotonic() < deadline, "the embedded PostgreSQL outlived converge up"
        time.sleep(0.2)


def test_sigterm_stops_converge_and_its_embedded_postgres(tmp_path: Path) -> None:
    proc = _up(tmp_path, free_port())
    try:
        assert _postgres_of(tmp_path), "the embedded PostgreSQL should be running"
        _stop_and_expect_no_postgres(proc, tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
        for leftover in _postgres_of(tmp_path):
            leftover.kill()


def test_after_a_kill_9_the_next_clean_stop_leaves_no_postgres(tmp_path: Path) -> None:
    """The killed process never removed itself from pgserver's handle list; the next start
    forgets it, adopts the running server, and its clean stop stops that server."""
    port = free_port()
    first = _up(tmp_path, port)
    second = None
    try:
        first.kill()
        first.wait(timeout=10)
        orphans = {p.pid for p in _postgres_of(tmp_path)}
        assert orphans, "a kill -9 leaves the postmaster running (it is adopted next)"
        second = _up(tmp_path, port)
        assert orphans & {p.pid for p in _postgres_of(tmp_path)}, "the running server was adopted"
        _stop_and_expect_no_postgres(second, tmp_path)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
        for leftover in _postgres_of(tmp_path):
            leftover.kill()

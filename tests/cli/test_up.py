"""`converge up` as operators run it: a real process on a real port, stopped with SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from services import converge_up, postgres_of
from support import free_port

pytestmark = [pytest.mark.slow]


def _stop_and_expect_no_postgres(proc: subprocess.Popen[bytes], data_dir: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != -signal.SIGTERM  # exited, not killed by the signal
    deadline = time.monotonic() + 15
    while postgres_of(data_dir):
        assert time.monotonic() < deadline, "the embedded PostgreSQL outlived converge up"
        time.sleep(0.2)


def test_sigterm_stops_converge_and_its_embedded_postgres(tmp_path: Path) -> None:
    proc = converge_up(tmp_path, free_port())
    try:
        assert postgres_of(tmp_path), "the embedded PostgreSQL should be running"
        _stop_and_expect_no_postgres(proc, tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
        for leftover in postgres_of(tmp_path):
            leftover.kill()


def test_after_a_kill_9_the_next_clean_stop_leaves_no_postgres(tmp_path: Path) -> None:
    """The killed process never removed itself from embedded-postgres's handle list; the next start
    forgets it, adopts the running server, and its clean stop stops that server."""
    port = free_port()
    first = converge_up(tmp_path, port)
    second = None
    try:
        first.kill()
        first.wait(timeout=10)
        orphans = {p.pid for p in postgres_of(tmp_path)}
        assert orphans, "a kill -9 leaves the postmaster running (it is adopted next)"
        second = converge_up(tmp_path, port)
        assert orphans & {p.pid for p in postgres_of(tmp_path)}, "the running server was adopted"
        _stop_and_expect_no_postgres(second, tmp_path)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
        for leftover in postgres_of(tmp_path):
            leftover.kill()

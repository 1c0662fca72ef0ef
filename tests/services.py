"""Real servers started by the tests on loopback: a moto S3 server and Debian's docker-registry.

A plain module, not a conftest: test directories that need a server import its fixture
(`from services import oci_registry, s3_server`) and pytest registers it there.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import psutil
import pytest
from support import BOOTSTRAP

__all__ = [
    "S3_CREDENTIALS",
    "converge_up",
    "free_port",
    "oci_registry",
    "postgres_of",
    "s3_server",
    "stop_process",
    "wait_for_http",
]

S3_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s:\n{log.read_text()}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Keyword arguments for `ArtifactStore.s3` pointing at a fresh bucket on a moto server.

    moto runs as a child process rather than a ThreadedMotoServer: moto keeps uploaded objects
    in Python memory, which would count against the tracemalloc memory assertions.
    """
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{endpoint}/moto-api/", proc, log)
        bucket = "converge-artifacts"
        # obstore cannot create buckets.
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=S3_CREDENTIALS["access_key_id"],
            aws_secret_access_key=S3_CREDENTIALS["secret_access_key"],
            region_name=S3_CREDENTIALS["region"],
        ).create_bucket(Bucket=bucket)
        yield {"endpoint": endpoint, "bucket": bucket, **S3_CREDENTIALS}
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`host:port` of a plain-HTTP, auth-free OCI registry (Debian's docker-registry)."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.skip("docker-registry not installed (apt-get install -y docker-registry)")
    root = tmp_path_factory.mktemp("registry")
    address = f"127.0.0.1:{free_port()}"
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {address}\n"
    )
    log = root / "registry.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://{address}/v2/", proc, log)
        yield address
    finally:
        stop_process(proc)


def postgres_of(data_dir: Path) -> list[psutil.Process]:
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


def _converge_env(data_dir: Path, port: int) -> dict[str, str]:
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


def converge_up(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """`converge up` on `data_dir` (embedded PostgreSQL, no workers), once it answers /readiness."""
    log = data_dir / "converge-up.log"  # appended: a restart's log follows the first one's
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "converge"), "up"],
            env=_converge_env(data_dir, port),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 90
    last = ""
    while True:
        try:
            resp = httpx.get(f"http://127.0.0.1:{port}/readiness", timeout=2)
            if resp.status_code == 200:
                return proc
            last = resp.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = log.read_text(errors="replace")[-3000:]
            raise AssertionError(
                f"converge up did not become ready (exit {proc.poll()}; last: {last})\n{tail}"
            )
        time.sleep(0.3)

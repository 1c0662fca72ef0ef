"""What the supervisor persists so that a new controller process can adopt running replicas.

`<state_dir>/replicas.json` holds the desired spec of every deployment and, per replica, enough
to recognise its process again (pid, start time, command line) and to keep supervising it
(revision, template, port). It is rewritten atomically (temp file, fsync, rename) whenever any of
that changes, so a crash at any moment leaves either the old or the new document.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import IO, Literal

import structlog
from pydantic import BaseModel, ValidationError

from converge.runtime.base import DeploymentSpec, ReplicaPhase, ReplicaTemplate

log = structlog.get_logger(__name__)


class ReplicaRecord(BaseModel):
    id: str
    deployment_id: uuid.UUID
    revision: int
    generation: int
    template: ReplicaTemplate
    phase: ReplicaPhase
    port: int | None = None
    gpus: list[str] = []  # CUDA_VISIBLE_DEVICES of its process
    pid: int | None = None
    create_time: float | None = None
    cmdline: list[str] = []
    started_at: datetime | None = None
    restarts: int = 0
    last_exit: str | None = None


class StateDoc(BaseModel):
    version: Literal[1] = 1
    deployments: list[DeploymentSpec] = []
    replicas: list[ReplicaRecord] = []


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._written: str | None = None

    def load(self) -> StateDoc:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return StateDoc()
        try:
            doc = StateDoc.model_validate_json(text)
        except ValidationError:
            # Never written half (atomic rename), so this is a foreign or newer format: keep it for
            # a person to look at and start empty rather than refuse to start.
            aside = self.path.with_suffix(".json.unreadable")
            log.warning("local_state_unreadable", path=str(self.path), moved_to=str(aside))
            os.replace(self.path, aside)
            return StateDoc()
        self._written = text
        return doc

    def save(self, doc: StateDoc) -> bool:
        """Write `doc` unless it is what the file already holds; True when written."""
        text = doc.model_dump_json(indent=1)
        if text == self._written:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._written = text
        return True


def hold_lock(path: Path) -> IO[bytes]:
    """An exclusive lock on the state_dir: two supervisors of the same replicas would fight.

    Held until the returned file is closed, or the process dies. Replicas do not inherit it
    (Python opens files close-on-exec).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "wb")  # the caller keeps it open for the backend's lifetime
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise RuntimeError(f"another local runtime supervises {path.parent}") from None
    return f

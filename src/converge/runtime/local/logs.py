"""Reading a replica's log file: the last lines, then (when following) whatever is appended."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

_BLOCK = 64 * 1024


def _decode(line: bytes) -> str:
    return line.rstrip(b"\r").decode("utf-8", errors="replace")


def _tail(f: BinaryIO, n: int) -> tuple[list[bytes], bytes, int]:
    """The last `n` complete lines, the unfinished line after them, and where that line starts."""
    end = f.seek(0, os.SEEK_END)
    pos, data = end, b""
    while pos > 0 and data.count(b"\n") <= n:
        step = min(_BLOCK, pos)
        pos -= step
        f.seek(pos)
        data = f.read(step) + data
    cut = data.rfind(b"\n") + 1
    lines = data[:cut].split(b"\n")[:-1]
    return (lines[-n:] if n > 0 else []), data[cut:], pos + cut


async def read_log(path: Path, *, tail: int, follow: bool, poll_s: float = 0.2) -> AsyncIterator[str]:
    # File reads run in a thread: a log on a slow disk must not stall the supervisor's loop.
    f = await asyncio.to_thread(open, path, "rb")
    try:
        lines, partial, offset = await asyncio.to_thread(_tail, f, tail)
        if not follow:
            if partial:
                lines = [*lines, partial][-tail:] if tail > 0 else []
            for line in lines:
                yield _decode(line)
            return
        for line in lines:
            yield _decode(line)
        f.seek(offset)
        pending = b""
        while True:
            chunk = await asyncio.to_thread(f.read, _BLOCK)
            if chunk:
                *complete, pending = (pending + chunk).split(b"\n")
                for line in complete:
                    yield _decode(line)
                continue
            if os.stat(path).st_size < f.tell():  # truncated: start over
                f.seek(0)
                pending = b""
            await asyncio.sleep(poll_s)
    finally:
        f.close()


def append_note(path: Path, message: str) -> None:
    """A supervisor line in a replica's log (the replica appends to the same file)."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"[converge {stamp}] {message}\n")

"""Loopback networking shared by the supervisor, builds and model servers."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the OS's choice for port 0); the caller must
    cope with losing it to another process before it binds (see runtime/local/ports.py)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

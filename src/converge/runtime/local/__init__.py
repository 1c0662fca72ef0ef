"""The local runtime: model-server replicas as supervised processes on this machine."""

from converge.runtime.local.config import LocalConfig
from converge.runtime.local.supervisor import LocalBackend

__all__ = ["LocalBackend", "LocalConfig"]

"""Real servers for the storage adapters: a moto S3 server and Debian's docker-registry.

The fixtures live in `tests/services.py` so other test directories can start the same servers.
"""

from services import oci_registry, s3_server

__all__ = ["oci_registry", "s3_server"]

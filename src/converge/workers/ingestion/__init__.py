"""The ingestion runner: files and object-storage prefixes into a knowledge base.

A job is claimed from the queue (or from a process that died: a running job whose heartbeat
is older than three heartbeats), and its documents go through one pipeline: read, hash, skip
what the base already holds, parse and chunk (in a thread), embed through the gateway in
batches across documents with several batches in flight (the embedding deployment never waits
for the next document to be parsed), and store. A document is stored in one transaction once
all of its vectors are in: its row upserted, its old chunks deleted and the new ones inserted,
so a search sees the old document or the new one, never half of each, and a batch that was
retried cannot leave duplicate chunks. Cancel is checked between documents and batches; what
was stored stays. A document that cannot be read, parsed or embedded is listed in the job's
errors and the others go on; the job fails only when every document failed or the source
itself is unusable (no embedding deployment, a prefix that cannot be listed).
"""

from converge.workers.ingestion.runner import IngestionRunner

__all__ = ["IngestionRunner"]

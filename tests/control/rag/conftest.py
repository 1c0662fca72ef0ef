"""Knowledge-base fixtures: a real all-MiniLM-L6-v2 replica behind the gateway.

The model is registered in the library from its installed folder (so its tokenizer.json and
sentence_bert_config.json are the version's artifacts, as with the built-in catalogue), and
deployed with the `embeddings` server in a committed project; the in-memory runtime reports the
replica started here as its endpoint, so embeddings go through the gateway exactly as a
client's would (auth, limits, metering). One replica per test process: loading torch and the
model takes a while on two cores.
"""

from __future__ import annotations

from rag_support import minilm, minilm_replica

__all__ = ["minilm", "minilm_replica"]  # the fixtures, shared with the CLI tests

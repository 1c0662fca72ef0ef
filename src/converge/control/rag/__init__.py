"""Knowledge bases: ingestion, chunking, embeddings through the gateway, pgvector retrieval."""

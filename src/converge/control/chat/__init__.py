"""The Gen AI runtime (the Chat Manager and the RAG Manager): RAG models (`ragmodels/`), chat
sessions with a per-turn trace (`sessions/`), rulesets (`rulesets/`), agents and their tools
(`agents/`, `tools/`), and `runtime.py`, which answers the gateway's virtual models (RAG models
and agents called by name through `/v1/chat/completions`)."""

"""The built-in tools: `knowledge_base_search` (the agent's project's knowledge bases, through the
same retrieval as POST /knowledge-bases/{id}/search) and `http_fetch` (GET, restricted to an
allow-list of URL prefixes, with a size and a time cap, redirects followed only inside the list)."""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from converge.config import ChatSettings
from converge.control.chat.tools.base import Tool, ToolFailed
from converge.control.rag import retrieval
from converge.control.rag.embedder import Embedder, EmbeddingFailed
from converge.gateway.api import Caller, Gateway
from converge.models import KnowledgeBase

MAX_QUERY_CHARS = 2000
MAX_REDIRECTS = 5
DEFAULT_MODE = "hybrid"


# -- knowledge_base_search -----------------------------------------------------------------------


def knowledge_base_search(
    session: AsyncSession,
    *,
    bases: list[KnowledgeBase],
    k: int,
    gateway: Gateway,
    caller: Caller,
    timeout_s: float,
) -> Tool:
    """Search `bases` (already checked to be the agent's project's) as `caller`: the query is
    embedded through the gateway under the caller's key, like any search."""
    by_name = {kb.name: kb for kb in bases}
    embedder = Embedder(gateway)
    key_id = caller.key.id if caller.key is not None else None

    async def search_one(kb: KnowledgeBase, query: str) -> list[dict[str, Any]]:
        mode = str((kb.retrieval or {}).get("mode") or DEFAULT_MODE)
        vector = None
        if kb.embedding_deployment_id is None:
            mode = "keyword"  # its embedding deployment was deleted: full text still works
        if mode != "keyword":
            assert kb.embedding_deployment_id is not None
            try:
                vectors = await embedder.embed(
                    [query], deployment_id=kb.embedding_deployment_id, project_id=kb.project_id, key_id=key_id
                )
            except EmbeddingFailed as exc:
                raise ToolFailed(
                    f"knowledge base '{kb.name}' could not embed the query: {exc.message}"
                ) from exc
            vector = vectors[0]
        found = await retrieval.search(session, kb, vector=vector, query=query, k=k, mode=mode, filters={})
        return [
            {
                "knowledge_base": kb.name,
                "document_id": str(hit.document_id),
                "chunk_id": hit.chunk_id,
                "title": hit.title,
                "source": hit.source,
                "page": hit.page,
                "score": round(hit.score, 4),
                "text": hit.text,
            }
            for hit in found.hits
        ]

    async def run(arguments: dict[str, Any]) -> str:
        query = arguments.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ToolFailed("'query' is required: the text to search for")
        if len(query) > MAX_QUERY_CHARS:
            raise ToolFailed(f"'query' is {len(query)} characters; at most {MAX_QUERY_CHARS}")
        name = arguments.get("knowledge_base")
        if name is not None and name not in by_name:
            raise ToolFailed(f"no knowledge base '{name}'; search one of: {', '.join(sorted(by_name))}")
        chosen = [by_name[name]] if name is not None else bases
        hits: list[dict[str, Any]] = []
        for kb in chosen:
            hits += await search_one(kb, query)
        if len(chosen) > 1:
            hits.sort(key=lambda h: -h["score"])
        return json.dumps({"results": hits}, ensure_ascii=False)

    names = sorted(by_name)
    return Tool(
        name="knowledge_base_search",
        description="Search the knowledge bases "
        + ", ".join(f"'{n}'" for n in names)
        + " and return the most relevant passages with their source.",
        parameters={
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to look for, in words"},
                "knowledge_base": {"type": "string", "enum": names, "description": "Only this base"},
            },
            "required": ["query"],
        },
        run=run,
        timeout_s=timeout_s,
    )


# -- http_fetch ----------------------------------------------------------------------------------


def _port(scheme: str, port: int | None) -> int:
    return port if port is not None else (443 if scheme == "https" else 80)


def allowed(url: str, prefixes: list[str]) -> bool:
    """The URL is under one of the prefixes: same scheme, host and port, and its path starts
    with the prefix's path at a segment boundary (`/docs` allows `/docs` and `/docs/a`, not
    `/docs-private`). Compared parsed, so `https://api.example.com.evil` is not under
    `https://api.example.com`, and no URL with credentials passes."""
    try:
        target = urlsplit(url)
        target_port = _port(target.scheme, target.port)
    except ValueError:
        return False
    if target.scheme not in ("http", "https") or not target.hostname or target.username or target.password:
        return False
    path = target.path or "/"
    for prefix in prefixes:
        p = urlsplit(prefix)
        if (p.scheme, (p.hostname or "").lower(), _port(p.scheme, p.port)) != (
            target.scheme,
            target.hostname.lower(),
            target_port,
        ):
            continue
        base = p.path or "/"
        if path.startswith(base) if base.endswith("/") else (path == base or path.startswith(base + "/")):
            return True
    return False


def http_fetch(*, allow: list[str], settings: ChatSettings, http: httpx.AsyncClient) -> Tool:
    async def run(arguments: dict[str, Any]) -> str:
        url = arguments.get("url")
        if not isinstance(url, str) or not url:
            raise ToolFailed("'url' is required: an absolute http(s) URL under the allow-list")
        for _ in range(MAX_REDIRECTS + 1):
            if not allowed(url, allow):
                raise ToolFailed(
                    f"{url} is not under the agent's allow-list ({', '.join(allow)}); not fetched"
                )
            async with http.stream("GET", url, follow_redirects=False) as response:
                if response.is_redirect and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                return await _read(response, url=url, limit=settings.http_fetch_max_bytes)
        raise ToolFailed(f"more than {MAX_REDIRECTS} redirects; stopped at {url}")

    return Tool(
        name="http_fetch",
        description="GET a web page or API response. Only URLs starting with one of these may be fetched: "
        + ", ".join(allow),
        parameters={
            "type": "object",
            "properties": {"url": {"type": "string", "description": "The absolute URL to GET"}},
            "required": ["url"],
        },
        run=run,
        timeout_s=settings.http_fetch_timeout_s,
    )


async def _read(response: httpx.Response, *, url: str, limit: int) -> str:
    body = bytearray()
    cut = False
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            del body[limit:]
            cut = True
            break
    text = body.decode(response.encoding or "utf-8", errors="replace")
    head = f"GET {url} -> {response.status_code} {response.headers.get('content-type', '')}".rstrip()
    if cut:
        head += f" (first {limit} bytes)"
    return head + "\n\n" + text


def kb_ids(spec: dict[str, Any]) -> list[uuid.UUID]:
    search = (spec.get("tools") or {}).get("knowledge_base_search") or {}
    return [uuid.UUID(ref["id"]) for ref in search.get("knowledge_bases") or []]

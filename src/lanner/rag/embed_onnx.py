"""A sentence-transformers folder run by ONNX Runtime: faster on a CPU, no torch.

The folder's Transformer module is exported once with ``torch.onnx.export``
(fp32) and, for the int8 runtime, quantised with ONNX Runtime's
``quantize_dynamic`` (int8 weights, activations quantised per batch; fast where
the CPU has VNNI instructions). Exports are cached in ``converted/onnx/`` of the
Lanner home, keyed by the content of the weights and config, so a reinstall of
the same model reuses them. Running needs only ``onnxruntime``, ``tokenizers``
and numpy; torch and transformers load only for the export.

Pooling and normalisation follow the folder's own modules (mean, CLS or max
pooling, then Normalize), so the fp32 runtime gives the torch path's vectors
to float rounding; int8 moves them slightly (measured in docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lanner.errors import BackendUnavailable, LannerError, ModelNotFound

EXPORT_VERSION = "1"
"""Part of the cache key: bump it when the export or quantisation changes."""
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SUPPORTED_MODULES = {"sentence_transformers.models.Transformer",
                     "sentence_transformers.models.Pooling",
                     "sentence_transformers.models.Normalize"}


class OnnxSentenceModel:
    """Encodes texts as sentence-transformers would, with an ONNX session.

    The members the callers use match ``SentenceTransformer``'s: ``encode``,
    ``tokenizer(texts)["input_ids"]`` (untruncated, for counting tokens) and
    ``max_seq_length``; ``get_embedding_dimension``.
    """

    def __init__(self, folder: Path, cache_root: Path, *, quantized: bool) -> None:
        self.folder = folder
        self.quantized = quantized
        self.pooling, self.normalize = _pipeline(folder)
        self.max_seq_length = _max_seq_length(folder)
        self._tokenizer = _tokenizer(folder)
        self.path = exported(folder, cache_root, quantized=quantized)
        self._sessions: dict[int, Any] = {}
        self._lock = threading.Lock()

    def get_embedding_dimension(self) -> int:
        return int(self.encode(["dimensions probe"]).shape[1])

    def tokenizer(self, texts: Sequence[str]) -> dict[str, list[list[int]]]:
        """Every text's ids, [CLS] and [SEP] included, not truncated."""
        encoded = self._tokenizer.encode_batch(list(texts))
        return {"input_ids": [list(e.ids) for e in encoded]}

    def encode(self, texts: Sequence[str], *, batch_size: int = 32, threads: int | None = None,
               normalize_embeddings: bool = True, **_: Any) -> np.ndarray:
        """(len(texts), d) float32. Texts are batched by length, as
        sentence-transformers does, so a batch carries little padding."""
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out: list[np.ndarray] = []
        for start in range(0, len(texts), batch_size):
            batch = [texts[i] for i in order[start:start + batch_size]]
            out.append(self._embed_batch(batch, threads))
        if not out:
            return np.zeros((0, 0), dtype=np.float32)
        vectors = np.empty((len(texts), out[0].shape[1]), dtype=np.float32)
        vectors[order] = np.concatenate(out)
        if normalize_embeddings or self.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors /= np.where(norms == 0, 1, norms)
        return vectors

    def _embed_batch(self, texts: list[str], threads: int | None) -> np.ndarray:
        encoded = self._tokenizer.encode_batch_fast(texts)  # ids only, no offsets
        n = min(max(len(e.ids) for e in encoded), self.max_seq_length)
        feed = {name: np.zeros((len(texts), n), dtype=np.int64) for name in INPUTS}
        for row, e in enumerate(encoded):
            ids = e.ids[:n - 1] + [e.ids[-1]] if len(e.ids) > n else e.ids  # keep [SEP]
            feed["input_ids"][row, :len(ids)] = ids
            feed["attention_mask"][row, :len(ids)] = 1
        hidden = self._session(threads).run(None, feed)[0]  # (B, T, d)
        return _pool(hidden, feed["attention_mask"], self.pooling)

    def _session(self, threads: int | None) -> Any:
        n = threads or os.cpu_count() or 1
        with self._lock:
            if n not in self._sessions:
                self._sessions[n] = _open_session(self.path, n)
            return self._sessions[n]


def _pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    if mode == "cls":
        return hidden[:, 0].astype(np.float32)
    weights = mask[:, :, None].astype(np.float32)
    if mode == "max":
        return np.where(weights > 0, hidden, -1e9).max(axis=1).astype(np.float32)
    summed = (hidden * weights).sum(axis=1)
    result: np.ndarray = summed / np.clip(weights.sum(axis=1), 1e-9, None)
    return result.astype(np.float32)


def _pipeline(folder: Path) -> tuple[str, bool]:
    """The pooling mode and whether the output is normalised, from modules.json;
    BackendUnavailable for modules this runner does not implement (Dense...)."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return "mean", True
    modules = json.loads(modules_file.read_text())
    unknown = {m["type"] for m in modules} - SUPPORTED_MODULES
    if unknown:
        raise BackendUnavailable(f"{folder}: the ONNX embedding runtime does not run "
                                 f"{', '.join(sorted(unknown))}; use --embed-runtime torch")
    pooling = "mean"
    for m in modules:
        if m["type"].endswith("Pooling"):
            config = json.loads((folder / m["path"] / "config.json").read_text())
            if config.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif config.get("pooling_mode_max_tokens"):
                pooling = "max"
            elif not config.get("pooling_mode_mean_tokens", True):
                raise BackendUnavailable(f"{folder}: pooling {config} is not supported by "
                                         "the ONNX embedding runtime; use --embed-runtime torch")
    return pooling, any(m["type"].endswith("Normalize") for m in modules)


def _max_seq_length(folder: Path) -> int:
    config = folder / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_seq_length") or 512)
    return 512


def _tokenizer(folder: Path) -> Any:
    """The folder's fast tokenizer, padding and truncation left to us."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelNotFound(f"{folder}: no tokenizer.json (the ONNX embedding runtime needs "
                            "a fast tokenizer); use --embed-runtime torch")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _open_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle threads sleep instead of spinning: on a shared machine spinning
    # steals the cores the other threads are waiting for.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# -- export and cache -------------------------------------------------------------


def content_key(folder: Path) -> str:
    """sha256 of the weights and config (and the export version). Hashing 90 MB
    takes a while, so the digest is remembered per (path, size, mtime)."""
    files = sorted(p for p in folder.iterdir()
                   if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise ModelNotFound(f"{folder}: no model weights (.safetensors or .bin)")
    digest = hashlib.sha256(EXPORT_VERSION.encode())
    for path in files:
        digest.update(path.name.encode())
        digest.update(_file_digest(path).encode())
    return digest.hexdigest()[:16]


_digests: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        with path.open("rb") as f:
            _digests[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _digests[key]


def exported(folder: Path, cache_root: Path, *, quantized: bool) -> Path:
    """The folder's encoder as ONNX (int8 if ``quantized``), exported on first use."""
    where = cache_root / content_key(folder)
    fp32, int8 = where / "model.onnx", where / "model.int8.onnx"
    if not fp32.exists() or (quantized and not int8.exists()):
        print(f"Exporting the embedding model {folder.name} to ONNX (once; kept in {where})",
              file=sys.stderr)
    if not fp32.exists():
        _export(folder, fp32)
    if quantized and not int8.exists():
        _quantize(fp32, int8)
    return int8 if quantized else fp32


def _export(folder: Path, dest: Path) -> None:
    try:
        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise BackendUnavailable(f"exporting the embedding model to ONNX needs {exc.name}, "
                                 "which is not installed") from exc
    # Eager attention traces into plain ops that honour the padding mask.
    model = AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    # A padded example: the exported graph must not assume a full mask.
    ids = torch.tensor([[101, 2023, 2003, 102], [101, 102, 0, 0]])
    mask = (ids != 0).long()
    axes = {name: {0: "batch", 1: "tokens"} for name in (*INPUTS, "last_hidden_state")}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".partial-{os.getpid()}")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on branches it fixed
            torch.onnx.export(Encoder(), (ids, mask, torch.zeros_like(ids)), str(tmp),
                              input_names=list(INPUTS), output_names=["last_hidden_state"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        tmp.replace(dest)
    except Exception as exc:  # the exporter raises many types
        tmp.unlink(missing_ok=True)
        raise LannerError(f"cannot export {folder} to ONNX: {exc}") from exc


def _quantize(fp32: Path, dest: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dest.with_suffix(f".partial-{os.getpid()}.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process, on the root logger
    try:
        # int8 weights per output channel; activations as uint8, quantised per
        # batch (VNNI's u8 x s8 dot products). MatMul only: quantising the
        # embedding lookups (Gather) or Attention saves nothing here.
        quantize_dynamic(str(fp32), str(tmp), per_channel=True, reduce_range=False,
                         weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        tmp.replace(dest)
    finally:
        root.setLevel(level)
        tmp.unlink(missing_ok=True)

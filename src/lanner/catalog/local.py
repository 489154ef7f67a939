"""A local model's real facts, read from its files without loading weights:
the architecture from the GGUF header or config.json, the parameter count
from the tensor shapes, the weights' size as they will be run."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lanner.catalog.entries import CatalogEntry, Licence, find, licence_for
from lanner.catalog.planner import Architecture, quant
from lanner.engine.registry import ModelSpec, registered
from lanner.errors import ModelLoadError

# llama.cpp's general.file_type (LLAMA_FTYPE_MOSTLY_*) -> the planner's names.
_GGUF_FILE_TYPES = {0: "fp32", 1: "fp16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0",
                    9: "q5_1", 10: "q2_k", 11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l",
                    14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s", 17: "q5_k_m", 18: "q6_k",
                    32: "bf16"}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2,
                      "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# config.json spellings across architectures, most common first.
_KEYS = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "attention_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"),
    "intermediate_size": ("intermediate_size", "ffn_hidden_size", "n_inner"),
    "context_length": ("max_position_embeddings", "n_positions", "max_sequence_length",
                       "seq_length", "n_ctx", "max_seq_len"),
    "experts": ("num_local_experts", "num_experts", "n_routed_experts"),
    "experts_per_token": ("num_experts_per_tok", "moe_topk"),
}


@dataclass(frozen=True, slots=True)
class LocalModel:
    spec: ModelSpec
    arch: Architecture
    parameters: int
    weights: int
    """Bytes of the weights as the backend will hold them."""
    runs_as: str
    """The weights' type ("fp16", "q4_k_m", "bf16"...)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The raw facts: GGUF key/values (big arrays left out) or config.json."""
    entry: CatalogEntry | None = None
    licence: Licence | None = None


def describe(spec: ModelSpec, home: Path) -> LocalModel:
    """Everything the planner and ``lanner info`` need about a local model.
    ModelLoadError if its header or config cannot be read."""
    repo = registered(home).get(spec.name, {}).get("repo") if spec.source != "local path" else None
    entry = find(repo) if repo else None
    if spec.format == "gguf":
        arch, params, weights, runs_as, config = _gguf(spec)
    else:
        arch, params, weights, runs_as, config = _hf(spec.path)
    licence = licence_for(spec.license) or licence_for(str(config.get("general.license", "")))
    if licence is None and entry is not None:
        from lanner.catalog.entries import licences

        licence = licences()[entry.licence]
    return LocalModel(spec, arch, params, weights, runs_as, config, entry, licence)


def _gguf(spec: ModelSpec) -> tuple[Architecture, int, int, str, dict[str, Any]]:
    from lanner.chat.metadata import read_gguf_parameters

    fields, params = read_gguf_parameters(spec.path)
    a = str(fields.get("general.architecture", ""))

    def num(key: str, default: int = 0) -> int:
        value = fields.get(f"{a}.{key}")
        return int(value) if isinstance(value, int | float) else default

    heads = num("attention.head_count", 1)
    hidden = num("embedding_length")
    head_dim = (num("attention.key_length", hidden // heads) +
                num("attention.value_length", hidden // heads)) // 2
    tokens = fields.get("tokenizer.ggml.tokens") or []
    arch = Architecture(
        layers=num("block_count"), hidden_size=hidden, attention_heads=heads,
        kv_heads=num("attention.head_count_kv", heads) or heads, head_dim=head_dim,
        vocab_size=num("vocab_size", len(tokens)), context_length=num("context_length"),
        intermediate_size=num("feed_forward_length"),
        sliding_window=num("attention.sliding_window"), experts=num("expert_count"),
        experts_per_token=num("expert_used_count"),
    )
    if spec.weights:  # llama.cpp re-encodes the file first (see ModelSpec.weights)
        runs_as = quant(spec.weights).name
        weights = int(params * quant(runs_as).bits / 8)
    else:
        runs_as = _GGUF_FILE_TYPES.get(int(fields.get("general.file_type", -1)), "gguf")
        weights = spec.path.stat().st_size
    config = {k: v for k, v in fields.items() if v is not None and not isinstance(v, list)
              and k != "tokenizer.chat_template"}
    return arch, params, weights, runs_as, config


def _hf(folder: Path) -> tuple[Architecture, int, int, str, dict[str, Any]]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder / 'config.json'}: cannot read: {exc}") from exc
    c = {**config, **config.get("text_config", {})} if isinstance(config, dict) else {}

    def num(name: str, default: int = 0) -> int:
        return next((int(c[k]) for k in _KEYS[name] if isinstance(c.get(k), int)), default)

    heads = num("attention_heads", 1)
    hidden = num("hidden_size")
    kv = num("kv_heads", 1 if c.get("multi_query") else heads)
    window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
    arch = Architecture(
        layers=num("layers"), hidden_size=hidden, attention_heads=heads, kv_heads=kv,
        head_dim=int(c.get("head_dim") or hidden // heads), vocab_size=int(c.get("vocab_size", 0)),
        context_length=num("context_length"), intermediate_size=num("intermediate_size"),
        sliding_window=int(window) if isinstance(window, int) else 0,
        experts=num("experts"), experts_per_token=num("experts_per_token"),
        tied_embeddings=bool(c.get("tie_word_embeddings", False)),
    )
    params, weights, dtypes = _safetensors(folder)
    main_dtype = max(dtypes.items(), key=lambda kv: kv[1])[0] if dtypes else "BF16"
    runs_as = {"F16": "fp16", "F32": "fp32"}.get(main_dtype, "bf16")
    return arch, params or arch.estimated_parameters(), weights, runs_as, config


def _safetensors(folder: Path) -> tuple[int, int, dict[str, int]]:
    """Parameters, bytes and bytes per dtype of the folder's .safetensors files,
    from their JSON headers (the tensors themselves are not read)."""
    params = size = 0
    dtypes: dict[str, int] = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with path.open("rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as exc:
            raise ModelLoadError(f"{path}: not a readable safetensors file: {exc}") from exc
        for name, t in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in t["shape"]:
                count *= d
            params += count
            nbytes = count * _SAFETENSORS_BYTES.get(t["dtype"], 2)
            size += nbytes
            dtypes[t["dtype"]] = dtypes.get(t["dtype"], 0) + nbytes
    return params, size, dtypes

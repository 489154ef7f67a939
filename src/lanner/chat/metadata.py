"""A model's metadata (chat template, special tokens, context length) without
loading its weights.

GGUF: only the key/value header is read, with a small stdlib parser. gguf's
GGUFReader parses every array element and maps every tensor, which takes
2.3-2.7 s on the bundled 98 MB SmolLM2 file; this reader needs ~0.1 s because it
decodes only the token strings it needs and skips the rest by length.
Hugging Face folders: tokenizer_config.json (+ chat_template.jinja /
chat_template.json) and config.json, read as transformers reads them.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Any

from lanner.backends.base import ModelMetadata
from lanner.engine.registry import ModelSpec, spec_for_path
from lanner.errors import ModelLoadError

# GGUF value types -> struct format of a scalar (8 = string and 9 = array are special).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
            11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# GGUF token-id keys -> the special-token names transformers gives them.
_GGUF_TOKEN_IDS = {"tokenizer.ggml.bos_token_id": "bos_token",
                   "tokenizer.ggml.eos_token_id": "eos_token",
                   "tokenizer.ggml.unknown_token_id": "unk_token",
                   "tokenizer.ggml.padding_token_id": "pad_token"}
_TOKENS_KEY = "tokenizer.ggml.tokens"
# config.json keys that hold the training context length, most specific first.
_CTX_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
             "n_ctx", "max_seq_len")
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                   "cls_token", "mask_token")


def read_metadata(spec: ModelSpec | Path) -> ModelMetadata:
    """Architecture, chat template, special tokens and training context of a
    model, read from its files without loading weights.

    ``extra`` holds "name", "path", "format" and "special_tokens" (every named
    special token's string, bos/eos included). ModelLoadError if unreadable.
    """
    if isinstance(spec, Path):
        spec = spec_for_path(spec)
    meta = _gguf_metadata(spec.path) if spec.format == "gguf" else _hf_metadata(spec.path)
    meta.extra.update(name=spec.name, path=str(spec.path), format=spec.format)
    return meta


# -- GGUF ----------------------------------------------------------------------


class _GGUFHeader:
    """Walks a GGUF key/value section in a memory map: scalars and strings are
    decoded, arrays skipped except the token list."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0
        if buf[:4] != b"GGUF":
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic)")
        # Big-endian files store the (small) version number byte-swapped.
        self.end = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"
        version = self._unpack("I", 4)
        if version < 2:
            raise ModelLoadError(f"{path}: GGUF version {version} is too old (need 2+)")
        self.pos = 16  # after magic, version and tensor count
        self.kv_count = self._unpack("Q")

    def _unpack(self, fmt: str, at: int | None = None) -> Any:
        pos = self.pos if at is None else at
        value = struct.unpack_from(self.end + fmt, self.buf, pos)[0]
        if at is None:
            self.pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("Q")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def _skip_strings(self, count: int) -> None:
        fmt = self.end + "Q"
        for _ in range(count):
            self.pos += 8 + struct.unpack_from(fmt, self.buf, self.pos)[0]

    def _value(self, vtype: int, keep_strings: bool) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])
        if vtype != _ARRAY:
            raise ModelLoadError(f"{self.path}: unknown GGUF value type {vtype}")
        etype, count = self._unpack("I"), self._unpack("Q")
        if etype == _STRING and keep_strings:
            return [self._string() for _ in range(count)]
        if etype == _STRING:
            self._skip_strings(count)
        elif etype in _SCALARS:
            self.pos += count * struct.calcsize(_SCALARS[etype])
        else:  # nested arrays: rare, walk them
            for _ in range(count):
                self._value(etype, False)
        return None

    def fields(self) -> dict[str, Any]:
        """Every scalar and string field, plus the token list; other arrays are None."""
        out: dict[str, Any] = {}
        for _ in range(self.kv_count):
            key = self._string()
            out[key] = self._value(self._unpack("I"), keep_strings=key == _TOKENS_KEY)
        return out

    def tensor_elements(self) -> int:
        """After ``fields()``: how many numbers the tensors hold (the parameter count)."""
        total = 0
        for _ in range(self._unpack("Q", 8)):
            self._string()  # name
            n_dims = self._unpack("I")
            count = 1
            for _ in range(n_dims):
                count *= self._unpack("Q")
            self.pos += 4 + 8  # type, offset
            total += count
        return total


def read_gguf_fields(path: Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (arrays other than the token list
    are None). ModelLoadError if the file is not a readable GGUF."""
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _GGUFHeader(buf, path).fields()
    except (OSError, ValueError, struct.error) as exc:
        raise ModelLoadError(f"{path}: cannot read GGUF metadata: {exc}") from exc


def read_gguf_parameters(path: Path) -> tuple[dict[str, Any], int]:
    """The key/value metadata and the parameter count (elements of all tensors)
    of a GGUF file, without reading any tensor data."""
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            header = _GGUFHeader(buf, path)
            fields = header.fields()
            return fields, header.tensor_elements()
    except (OSError, ValueError, struct.error) as exc:
        raise ModelLoadError(f"{path}: cannot read GGUF metadata: {exc}") from exc


def _gguf_metadata(path: Path) -> ModelMetadata:
    fields = read_gguf_fields(path)
    tokens: list[str] = fields.get(_TOKENS_KEY) or []
    special = {}
    for key, name in _GGUF_TOKEN_IDS.items():
        token_id = fields.get(key)
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            special[name] = tokens[token_id]
    arch = str(fields.get("general.architecture", "unknown"))
    extra: dict[str, object] = {"special_tokens": special}
    for key in ("general.name", "general.license", "general.file_type"):
        if fields.get(key) is not None:
            extra[key] = fields[key]
    return ModelMetadata(
        architecture=arch,
        chat_template=fields.get("tokenizer.chat_template") or None,
        bos_token=special.get("bos_token"),
        eos_token=special.get("eos_token"),
        n_ctx_train=int(fields.get(f"{arch}.context_length") or 0),
        extra=extra,
    )


# -- Hugging Face folders ------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an
    AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _hf_chat_template(folder: Path, tok_config: dict[str, Any]) -> str | None:
    """transformers' order: chat_template.jinja, then tokenizer_config.json's
    chat_template (a string, or a list of named templates: the "default" one),
    then the legacy chat_template.json."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template
    legacy = _read_json(folder / "chat_template.json").get("chat_template")
    return legacy if isinstance(legacy, str) and legacy else None


def _hf_metadata(folder: Path) -> ModelMetadata:
    config = _read_json(folder / "config.json")
    tok_config = _read_json(folder / "tokenizer_config.json")
    special = {name: text for name in _SPECIAL_TOKENS
               if (text := _token_text(tok_config.get(name))) is not None}
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    n_ctx = next((int(c[k]) for c in (config, text_config or {}) for k in _CTX_KEYS
                  if isinstance(c.get(k), int)), 0)
    return ModelMetadata(
        architecture=str(config.get("model_type", "unknown")),
        chat_template=_hf_chat_template(folder, tok_config),
        bos_token=special.get("bos_token"),
        eos_token=special.get("eos_token"),
        n_ctx_train=n_ctx,
        extra={"special_tokens": special},
    )

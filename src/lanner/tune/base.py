"""The base model of a fine-tuning run: its folder, tokenizer and ChatFormat.

The ChatFormat is built from the tokenizer exactly as the transformers backend
builds it (``TransformersBackend._metadata``), so a tuned model is trained on
the very text that ``lanner chat --backend transformers`` sends it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lanner.backends.base import ModelMetadata
from lanner.engine.chatformat import ChatFormat, resolve_chat_format
from lanner.engine.registry import resolve
from lanner.errors import BackendUnavailable, ModelLoadError, NotSupported


def base_model_folder(name: str, home: Path) -> Path:
    """The Hugging Face folder of ``name`` (a Lanner name, folder or .gguf); a
    GGUF is converted once to safetensors into ``home/converted``, where the
    transformers backend looks for it too."""
    spec = resolve(name, home)
    if spec.format != "gguf":
        return spec.path
    from lanner.backends.gguf_convert import converted_folder

    return converted_folder(spec.path, home / "converted")


def load_tokenizer(folder: Path) -> Any:
    """The folder's fast (Rust) tokenizer: loss masking needs its character offsets."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise BackendUnavailable(f"fine-tuning needs transformers: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # loaders raise many types on unreadable folders
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise ModelLoadError(f"{folder}: cannot load the tokenizer: {lines[0]}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise NotSupported(f"{folder}: the tokenizer has no fast (tokenizer.json) version; "
                           "fine-tuning needs one to mark the trained tokens")
    return tokenizer


def tokenizer_chat_format(tokenizer: Any, override: str | None = None) -> ChatFormat:
    """The ChatFormat of a model whose tokenizer is ``tokenizer`` (``override``:
    a built-in name or a .jinja path, as ``--chat-format``)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    metadata = ModelMetadata(
        architecture="unknown", chat_template=template, bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token, n_ctx_train=0,
        extra={"name": getattr(tokenizer, "name_or_path", "") or "the base model"})
    return resolve_chat_format(metadata, override)

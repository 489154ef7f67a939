"""GGUF -> safetensors, once: transformers dequantises a GGUF file to float32;
the result is saved as a Hugging Face folder in a cache so the next open is fast.

Cache layout (``root`` defaults to ``<Lanner home>/converted``; the engine
passes its own home's; see ``conversion_cache`` for the key and pruning)::

    <root>/<sha256 of the .gguf, first 16 hex>/
        config.json, generation_config.json, model.safetensors,
        tokenizer.json, tokenizer_config.json, chat_template.jinja, ...
        lanner-conversion.json   # where it came from: source path, sha256, versions

A conversion is written to a temporary folder beside the final one and renamed
into place, so a crash never leaves a half-written cache entry.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path

from lanner.backends.conversion_cache import KEY_HEX, MANIFEST, prune, source_sha256
from lanner.errors import BackendUnavailable, ModelLoadError
from lanner.store.hashing import sha256_of_file


def gguf_sha256(path: Path) -> str:
    """Hex sha256 of the file's bytes."""
    return sha256_of_file(path)


def default_cache_root() -> Path:
    """``<Lanner home>/converted`` (LANNER_HOME, else the user data folder)."""
    from lanner.paths import home

    return home() / "converted"


def converted_folder(gguf_path: Path, cache_root: Path | None = None) -> Path:
    """The safetensors folder for ``gguf_path``, converting it the first time.

    ``cache_root`` holds one sub-folder per GGUF content hash, so renaming,
    copying or reinstalling a GGUF reuses its conversion; a new conversion
    removes the entries no source uses any more. Raises ``ModelLoadError`` if the
    file cannot be converted, ``BackendUnavailable`` if the ``gguf`` package is
    missing.
    """
    root = cache_root if cache_root is not None else default_cache_root()
    sha = source_sha256(gguf_path, root)
    final = root / sha[:KEY_HEX]
    if (final / MANIFEST).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:KEY_HEX]}.", suffix=".partial", dir=root))
    try:
        _convert(gguf_path, tmp)
        _write_manifest(tmp, gguf_path, sha)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prune(root)
    return final


def _convert(gguf_path: Path, dest: Path) -> None:
    """Dequantise ``gguf_path`` with transformers and save model + tokenizer in ``dest``."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise BackendUnavailable(
            f"converting GGUF needs torch, transformers and gguf: {exc}"
        ) from exc
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True,
            **_dequantize_kwargs(),
        )
        _drop_quantizer(model)
    # Loaders raise many exception types on files they cannot read (ValueError
    # for unsupported architectures, KeyError/TypeError for odd metadata...).
    except Exception as exc:
        raise ModelLoadError(f"{gguf_path}: cannot convert GGUF: {_one_line(exc)}") from exc
    if not tokenizer.chat_template:
        # Older transformers drop the template; the GGUF still carries it.
        tokenizer.chat_template = gguf_chat_template(gguf_path)
    try:
        model.save_pretrained(dest)
        tokenizer.save_pretrained(dest)
    except OSError as exc:
        raise ModelLoadError(f"cannot write the converted model to {dest}: {exc}") from exc


def _dequantize_kwargs() -> dict[str, object]:
    """Ask for dense float weights even where GGUF matmul kernels are installed
    (transformers >= 5.2x can keep GGUF blocks packed, which cannot be saved)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_quantizer(model: object) -> None:
    """Forget the GGUF quantizer of a dequantised model so it saves as plain safetensors."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def gguf_chat_template(path: Path) -> str | None:
    """The ``tokenizer.chat_template`` string stored in a GGUF, if any."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) else None


def _write_manifest(dest: Path, source: Path, sha: str) -> None:
    import transformers

    record = {
        "source": str(source.resolve()),
        "sha256": sha,
        "dtype": "float32",
        "transformers": transformers.__version__,
        "converted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (dest / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")


def read_manifest(folder: Path) -> dict[str, object]:
    """The conversion record of a cached folder ({} if it is not a conversion)."""
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    data: dict[str, object] = json.loads(path.read_text())
    return data


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if not (final / MANIFEST).is_file():
            raise ModelLoadError(f"cannot store the converted model in {final}: {exc}") from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

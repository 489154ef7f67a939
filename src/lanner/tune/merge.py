"""Merge a LoRA adapter into its base model: a full safetensors model folder
(the tokenizer and chat template the adapter was trained with included), and
optionally a GGUF file that llama.cpp can serve (see ``gguf_export``).

The merge runs in float32 (``W + B A x alpha / r``) and is saved in the base
model's own dtype.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lanner import __version__, paths
from lanner.backends.hf_adapters import check_adapter, quiet_peft
from lanner.errors import InvalidRequest, ModelLoadError
from lanner.tune.base import base_model_folder
from lanner.tune.trainer import ADAPTER_INFO

MERGE_INFO = "lanner-merge.json"


@dataclass
class Merged:
    folder: Path
    """The merged model (safetensors, tokenizer, chat template)."""
    gguf: Path | None = None
    """The GGUF file, when asked for."""


def merge(adapter: str | Path, out: str | Path | None = None, *, base: str | None = None,
          home: str | Path | None = None, gguf: bool = False) -> Merged:
    """Merge the adapter folder ``adapter`` into its base model.

    ``out``: the folder to write (default: ``merged`` beside the adapter);
    ``base``: the base model (a Lanner name, folder or .gguf) when the adapter
    does not name it; ``gguf``: also write ``out/model.gguf`` (needs a base that
    was a GGUF file; ``NotSupported`` otherwise).
    """
    folder = check_adapter(adapter)
    base_folder = base_of(folder, base, paths.home(home))
    target = Path(out).expanduser() if out is not None else folder.parent / "merged"
    if gguf:  # refuse before any work
        from lanner.tune import gguf_export

        source = gguf_export.source_gguf(base_folder)
    model, targets = _merged_model(base_folder, folder)
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save_pretrained(partial)
    tokenizer = _tokenizer(folder, base_folder)
    tokenizer.save_pretrained(partial)
    info = {"base_folder": str(base_folder), "adapter": str(folder), "lanner": __version__}
    (partial / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    gguf_path = None
    if gguf:
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
        gguf_export.export(model, targets, source, partial / "model.gguf", template)
        gguf_path = target / "model.gguf"
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return Merged(target, gguf_path)


def base_of(adapter: Path, base: str | None, home: Path) -> Path:
    """The base model folder of an adapter: ``base`` if given, else what
    ``lanner tune`` recorded, else peft's ``base_model_name_or_path``."""
    if base:
        return base_model_folder(base, home)
    info_file = adapter / ADAPTER_INFO
    if info_file.is_file():
        info = json.loads(info_file.read_text(encoding="utf-8"))
        recorded = Path(info.get("base_folder", ""))
        if (recorded / "config.json").is_file():
            return recorded
        return base_model_folder(info["base_model"], home)
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    named = config.get("base_model_name_or_path")
    if named and (Path(named) / "config.json").is_file():
        return Path(named)
    raise InvalidRequest("--base", f"{adapter} does not say which model it was trained on "
                         "(or that folder is gone); name the base model with --base")


def _merged_model(base_folder: Path, adapter: Path) -> tuple[Any, list[str]]:
    """The base with the adapter merged in, and the names of the weights it changed."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32,
                                                     local_files_only=True)
    except Exception as exc:  # loaders raise many types on unreadable folders
        raise ModelLoadError(f"{base_folder}: cannot load: {_first_line(exc)}") from exc
    saved_dtype = getattr(model.config, "dtype", None)
    try:
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(model, adapter)
    except Exception as exc:  # peft: modules or shapes that do not match this base
        raise ModelLoadError(f"{adapter}: cannot load onto {base_folder}: "
                             f"{_first_line(exc)}") from exc
    targets = [name.removeprefix("base_model.model.") + ".weight"
               for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]
    merged = peft_model.merge_and_unload()
    if isinstance(saved_dtype, torch.dtype) and saved_dtype != torch.float32:
        merged = merged.to(saved_dtype)
    return merged, targets


def _tokenizer(adapter: Path, base_folder: Path) -> Any:
    """The adapter's tokenizer (with the template it was trained on), else the base's."""
    from transformers import AutoTokenizer

    source = adapter if (adapter / "tokenizer_config.json").is_file() else base_folder
    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__

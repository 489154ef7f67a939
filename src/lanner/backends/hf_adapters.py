"""LoRA adapters (peft format) on a loaded Hugging Face model, several sharing
one copy of the base weights.

peft injects every adapter's layers into the base model in place; which one a
forward pass uses is module state (``set_adapter`` / ``disable_adapter_layers``).
So every model call of a backend goes through ``Adapters.use(name)``: it holds
one lock for the call and switches the active adapter first when it differs.
The lock is held for one forward pass, never across a ``yield``, so requests
for different adapters interleave token by token and never see each other's
weights. The batch scheduler (``hf_batching``) runs one forward pass per
adapter among its running requests for the same reason. (peft's per-row
``adapter_names`` would batch mixed adapters, but it works through temporary
hooks, module state again, so it would need the same lock.)
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lanner.errors import ModelLoadError, ModelNotFound

CONFIG = "adapter_config.json"


def check_adapter(path: str | Path) -> Path:
    """The adapter folder, or ModelNotFound / ModelLoadError saying what is wrong."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelNotFound(f"no such adapter folder: {folder}")
    if not (folder / CONFIG).is_file():
        raise ModelLoadError(f"{folder}: not a peft adapter folder (no {CONFIG})")
    try:
        kind = json.loads((folder / CONFIG).read_text(encoding="utf-8")).get("peft_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{folder / CONFIG}: cannot read: {exc}") from exc
    if kind != "LORA":
        raise ModelLoadError(f"{folder}: a {kind} adapter; only LoRA adapters are supported")
    return folder.resolve()


def chat_template(folder: Path) -> str | None:
    """The chat template an adapter was trained with, if it ships a tokenizer
    (``lanner tune`` saves one: the template of the ChatFormat it trained on)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


@contextmanager
def quiet_peft() -> Iterator[None]:
    """peft 0.21 reads a property transformers 5 deprecates: not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        yield


class Adapters:
    """The adapters loaded on one base model, and the lock its calls share."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.lock = threading.Lock()
        self._peft: Any = None
        self._active: str | None = None
        self.names: dict[str, Path] = {}

    def add(self, path: str | Path, name: str) -> str:
        """Load the adapter at ``path`` as ``name``; the base weights are shared."""
        folder = check_adapter(path)
        with self.lock:
            if name in self.names:
                raise ModelLoadError(f"an adapter named {name!r} is already loaded")
            try:
                with quiet_peft():
                    self._load(folder, name)
            # peft raises ValueError/RuntimeError/KeyError for an adapter whose
            # modules or shapes do not match this base.
            except Exception as exc:
                lines = str(exc).strip().splitlines() or [type(exc).__name__]
                raise ModelLoadError(f"{folder}: cannot load onto this model: {lines[0]}") from exc
            self._active = name
            self._peft.set_adapter(name)
            self.names[name] = folder
        return name

    def _load(self, folder: Path, name: str) -> None:
        from peft import PeftModel

        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self.model, folder, adapter_name=name)
        else:
            self._peft.load_adapter(folder, adapter_name=name)

    @contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Hold the lock with adapter ``name`` active (None: the base model)."""
        with self.lock:
            if self._peft is not None and name != self._active:
                self._switch(name)
            yield

    def _switch(self, name: str | None) -> None:
        lora = self._peft.base_model
        if name is None:
            lora.disable_adapter_layers()
        else:
            if self._active is None:
                lora.enable_adapter_layers()
            self._peft.set_adapter(name)
        self._active = name

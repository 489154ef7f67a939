"""Lanner: a workbench for open-weight language models on your own hardware.

    >>> import lanner
    >>> model = lanner.load("smollm2")
    >>> model.generate("What is the capital of France?", temperature=0)

Importing this package is cheap: backends (torch, llama.cpp) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lanner.engine.engine import Engine
    from lanner.engine.model import Model


def load(name: str = "smollm2", *, home: str | None = None, **options: Any) -> Model:
    """Load a model by short name, path or registry entry.

    ``options`` go to the engine: ``backend`` ("llama.cpp" or "transformers"),
    ``chat_format`` (a built-in name or a .jinja file), and backend options such
    as ``n_ctx`` or ``dtype``.
    """
    from lanner.engine.engine import Engine

    return Engine(home).load(name, **options)


def engine(home: str | None = None) -> Engine:
    from lanner.engine.engine import Engine

    return Engine(home)


__all__ = ["__version__", "engine", "load"]

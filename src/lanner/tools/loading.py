"""Tools named on the command line: ``module:function``, ``path/to/file.py:function``,
or a built-in tool by name (``python``, the sandboxed code interpreter).

Built-ins are "module:factory" strings imported only when asked for; a factory
takes the confirmation settings (``yes``, ``confirm``) and returns a Tool.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lanner.errors import InvalidRequest
from lanner.tools.schema import Tool, make_tool

BUILTIN: dict[str, str] = {
    "python": "lanner.tools.python_tool:python_tool",
}


def load_tool(spec: str, *, yes: bool = False,
              confirm: Callable[[str], bool] | None = None) -> Tool:
    """The Tool named by ``spec``; InvalidRequest("--tool", ...) if it cannot be loaded."""
    if spec in BUILTIN:
        factory = _import(BUILTIN[spec])
        built: Tool = factory(yes=yes, confirm=confirm)
        return built
    if ":" not in spec:
        raise InvalidRequest("--tool", f"{spec!r} is not module:function, a file.py:function "
                             f"or a built-in tool ({', '.join(BUILTIN)})")
    fn = _import(spec)
    if not callable(fn):
        raise InvalidRequest("--tool", f"{spec} is not a function")
    return make_tool(fn)


def _import(spec: str) -> Any:
    where, _, attr = spec.rpartition(":")
    try:
        module = _load_file(Path(where)) if where.endswith(".py") else \
            importlib.import_module(where)
    except (ImportError, SyntaxError) as exc:
        raise InvalidRequest("--tool", f"cannot import {where}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise InvalidRequest("--tool", f"{where} has no {attr!r}") from None


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise InvalidRequest("--tool", f"no such file: {path}")
    name = f"lanner_user_tools_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InvalidRequest("--tool", f"cannot load {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pydantic look the module up by name
    spec.loader.exec_module(module)
    return module

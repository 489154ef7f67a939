"""The prompts Lanner itself writes (tools, strategies, the shell agent) live as
Jinja files in ``lanner/prompts/``; this renders them.

Undefined variables are an error (a typo in a prompt must not silently render
as nothing); the text is used exactly as written, trailing newline included.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import jinja2

from lanner.errors import LannerError


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              autoescape=False, trim_blocks=True, lstrip_blocks=True)


@cache
def _source(name: str) -> str:
    try:
        return resources.files("lanner").joinpath("prompts", name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LannerError(f"prompt template {name} is missing from the package: {exc}") from exc


def render_prompt(template: str, /, **variables: Any) -> str:
    """Render ``lanner/prompts/<template>`` (e.g. ``"tools_default_system.jinja"``)."""
    return _environment().from_string(_source(template)).render(**variables)

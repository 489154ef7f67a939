"""Answers side by side in the terminal, as they stream (``compare`` and ``arena``).

On a terminal the block of columns is redrawn in place as text arrives (only
its last rows while it is taller than the screen) and printed whole at the
end. Anywhere else (a pipe, a file) the answers are printed one after
another, each under a header line, so the output reads top to bottom.
Widths count characters, not display cells: CJK text and emoji may misalign.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from collections.abc import Sequence
from typing import TextIO

GAP = " | "
_UP_AND_CLEAR = "\x1b[{}F\x1b[J"  # cursor to the start of the line N up, clear below


def wrap(text: str, width: int) -> list[str]:
    """``text`` wrapped to ``width`` characters, its own line breaks kept."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        lines += textwrap.wrap(paragraph, width, replace_whitespace=False,
                               drop_whitespace=True, break_on_hyphens=False) or [""]
    return lines


def side_by_side(titles: Sequence[str], texts: Sequence[str], width: int) -> list[str]:
    """The rows of the block: a title row, a rule, then the wrapped columns."""
    n = len(titles)
    col = max(8, (width - len(GAP) * (n - 1)) // n)
    wrapped = [wrap(t, col) for t in texts]
    height = max(len(w) for w in wrapped)
    rows = [GAP.join(t[:col].ljust(col) for t in titles).rstrip(),
            GAP.join("-" * col for _ in titles)]
    for i in range(height):
        cells = [w[i] if i < len(w) else "" for w in wrapped]
        rows.append(GAP.join(c.ljust(col) for c in cells).rstrip())
    return rows


class Columns:
    """Collects each column's text (``add``) and shows it; ``close`` ends the block.

    ``live``: redraw in place (default: when ``out`` is a terminal)."""

    def __init__(self, titles: Sequence[str], out: TextIO | None = None, *,
                 live: bool | None = None) -> None:
        out = out or sys.stdout  # looked up now, not at import (tests replace it)
        self.titles = list(titles)
        self.texts = ["" for _ in titles]
        self.out = out
        self.live = out.isatty() if live is None else live
        self._shown = 0  # live: rows drawn so far; else: columns whose header is out
        self._current = -1

    def add(self, index: int, text: str) -> None:
        self.texts[index] += text
        if self.live:
            self._redraw(tail=True)
            return
        if index != self._current:
            if self._current >= 0:
                self.out.write("\n\n")
            self.out.write(f"=== {self.titles[index]} ===\n")
            self._current = index
        self.out.write(text)
        self.out.flush()

    def close(self) -> None:
        """The whole block (live), or the last answer's line end."""
        if self.live:
            self._redraw(tail=False)
        else:
            for index in range(len(self.titles)):  # answers that had no text at all
                if self._current < index:
                    self.add(index, "")
            self.out.write("\n")
        self.out.flush()

    def _redraw(self, tail: bool) -> None:
        size = shutil.get_terminal_size()
        rows = side_by_side(self.titles, self.texts, size.columns - 1)
        if tail and len(rows) > size.lines - 1:
            rows = rows[: 2] + rows[len(rows) - (size.lines - 3):]
        if self._shown:
            self.out.write(_UP_AND_CLEAR.format(self._shown))
        self.out.write("\n".join(rows) + "\n")
        self._shown = len(rows)
        self.out.flush()

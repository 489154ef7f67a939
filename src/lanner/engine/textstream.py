"""Turning token text into safe deltas: stop strings never leak, not even partly.

Backends push each token's decoded text (already whole UTF-8 characters) and get
back what may be shown now. Text that could be the start of a stop string is held
until the next token shows it is not.
"""

from __future__ import annotations

from lanner.engine.types import TextDelta, Token


class StopBuffer:
    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = stop
        self.hit = False
        self._pending = ""
        self._tokens: list[tuple[Token, int]] = []  # (token, end offset in _pending)

    def push(self, text: str, token: Token | None = None) -> TextDelta | None:
        """Add one token's text; return the delta that is safe to emit, if any.

        After a stop string is found, ``hit`` is True and the returned delta ends
        just before it; the caller stops generating.
        """
        self._pending += text
        if token is not None:
            self._tokens.append((token, len(self._pending)))
        cut = self._first_stop()
        if cut is not None:
            self.hit = True
            return self._release(cut, drop_rest=True)
        return self._release(len(self._pending) - self._held_suffix())

    def flush(self) -> TextDelta | None:
        """At the end of generation: release whatever is still held."""
        return self._release(len(self._pending))

    def _first_stop(self) -> int | None:
        found = [i for i in (self._pending.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held_suffix(self) -> int:
        """Length of the longest suffix of pending text that starts a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(s[:n]):
                    best = n
                    break
        return best

    def _release(self, upto: int, drop_rest: bool = False) -> TextDelta | None:
        text = self._pending[:upto]
        # A token goes out with the delta that completes its text; when a stop
        # string cuts, the token that started the stop string goes out too.
        tokens: list[Token] = []
        kept: list[tuple[Token, int]] = []
        for token, end in self._tokens:
            start = end - len(token.text)
            if end <= upto or (drop_rest and start < upto):
                tokens.append(token)
            elif not drop_rest:
                kept.append((token, end - upto))
        self._tokens = kept
        self._pending = "" if drop_rest else self._pending[upto:]
        if not text and not tokens:
            return None
        return TextDelta(text=text, tokens=tuple(tokens))

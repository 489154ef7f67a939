"""Stop strings never leak, not even partly, and tokens travel with their text."""

from __future__ import annotations

from lanner.engine.textstream import StopBuffer
from lanner.engine.types import TextDelta, Token


def _run(pieces: list[str], stop: tuple[str, ...]) -> tuple[list[TextDelta], bool]:
    buf = StopBuffer(stop)
    out = []
    for i, piece in enumerate(pieces):
        delta = buf.push(piece, Token(i, piece))
        if delta:
            out.append(delta)
        if buf.hit:
            return out, True
    tail = buf.flush()
    return ([*out, tail] if tail else out), False


def test_stop_split_across_tokens_is_cut_and_never_shown() -> None:
    deltas, hit = _run(["Hello", " wor", "ld\nUs", "er: more"], ("\nUser:",))
    assert hit
    assert "".join(d.text for d in deltas) == "Hello world"
    assert all("\n" not in d.text for d in deltas)


def test_partial_match_that_does_not_complete_is_released() -> None:
    deltas, hit = _run(["a\n", "Usb", "!"], ("\nUser:",))
    assert not hit
    assert "".join(d.text for d in deltas) == "a\nUsb!"
    # every token reaches the caller exactly once, in order
    assert [t.id for d in deltas for t in d.tokens] == [0, 1, 2]


def test_text_held_back_only_while_it_could_start_a_stop() -> None:
    buf = StopBuffer(("</s>",))
    first = buf.push("ab<", Token(0, "ab<"))
    assert first is not None and first.text == "ab"
    second = buf.push("x", Token(1, "x"))
    assert second is not None and second.text == "<x"


def test_earliest_of_several_stops_wins() -> None:
    deltas, hit = _run(["one TWO three ONE"], ("ONE", "TWO"))
    assert hit
    assert "".join(d.text for d in deltas) == "one "


def test_no_stops_passes_everything_through() -> None:
    deltas, hit = _run(["x", "y"], ())
    assert not hit and [d.text for d in deltas] == ["x", "y"]

"""Cited answers: the prompt with numbered passages, and the check of every
citation in the model's answer.

The prompt comes from ``lanner/prompts/rag_answer.jinja``. The model is asked
to cite passages as ``[1]``, ``[2]``. ``verify`` then checks each citation:
the cited passage must exist, and it must share the claim's key content --
at least ``SUPPORT`` (60%) of the claim's content words (stemmed, stop words
dropped) and every number the claim states. A citation that fails is
flagged with the reason; ``Answer.marked_text`` shows it as ``[n?]``, so an
unchecked citation is never presented as fact.

An answer that cites nothing (small models' often do) comes with
``Answer.extracted``: the sentences of the top passages that best match the
question, copied from the documents, so the user still sees what they say.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lanner.chat.prompts import render_prompt
from lanner.rag.rewrite import Queries
from lanner.rag.search import Hit
from lanner.rag.text import content_words, numbers

SUPPORT = 0.6
"""Share of a claim's content words its passage must contain: of two key
words both, of three two, of four three."""

_ONE = r"\[\s*\d+(?:\s*(?:,|;|and)\s*\d+)*\s*\]"
_GROUP = re.compile(rf"{_ONE}(?:\s*{_ONE})*")
"""A citation marker group: [1], [1, 2], [1][3]."""
_SENTENCE_BREAK = re.compile(r"[.!?](?=\s)|\n")
EXTRACT_PASSAGES = 3
"""How many of the top passages an uncited answer shows a sentence of."""


@dataclass(frozen=True, slots=True)
class Source:
    """A passage the model was given, numbered as in the prompt."""

    number: int
    path: str
    page: int | None
    start: int
    end: int
    """``page_text[start:end] == text``: the exact span in the source."""
    heading: str
    text: str
    score: float

    @classmethod
    def from_hit(cls, number: int, hit: Hit) -> Source:
        c = hit.chunk
        return cls(number, c.path, c.page, c.start, c.end, c.heading, c.text, hit.score)

    @property
    def label(self) -> str:
        """``name.pdf, page 3 (Heading > Sub)``: how the prompt names it."""
        where = Path(self.path).name + (f", page {self.page}" if self.page else "")
        return f"{where} ({self.heading})" if self.heading else where

    @property
    def location(self) -> str:
        """``/full/path.pdf, page 3, characters 120-940``: where to check it."""
        page = f", page {self.page}" if self.page else ""
        return f"{self.path}{page}, characters {self.start}-{self.end}"


@dataclass(frozen=True, slots=True)
class Citation:
    number: int
    claim: str
    """The text the citation is attached to (its sentence, or the part of it
    after the previous citation)."""
    verified: bool
    reason: str
    """Why it passed or failed, in words."""
    marker: tuple[int, int]
    """Span of the ``[..]`` marker group in the answer text."""


@dataclass(frozen=True, slots=True)
class Extract:
    """A sentence copied from a passage (not written by the model)."""

    number: int
    """The passage it comes from."""
    text: str
    start: int
    end: int
    """Its span in the source, like ``Source.start``/``end``."""


@dataclass(slots=True)
class Answer:
    question: str
    query: str
    """What retrieval searched for (the question, or its standalone rewrite)."""
    text: str
    """The model's answer as written."""
    sources: list[Source]
    citations: list[Citation] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    """Exactly what the model was given."""
    uncited: list[str] = field(default_factory=list)
    """Sentences that state something but cite nothing."""
    retrieval: Queries | None = None
    """Every query retrieval used, and a rewrite it rejected."""
    extracted: list[Extract] = field(default_factory=list)
    """When the answer cites nothing: the best-matching sentence of each top
    passage (see ``extract``); else empty."""

    @property
    def flagged(self) -> list[Citation]:
        return [c for c in self.citations if not c.verified]

    @property
    def cited(self) -> list[Source]:
        """The sources the answer cites, by number."""
        numbers_ = {c.number for c in self.citations}
        return [s for s in self.sources if s.number in numbers_]

    def marked_text(self) -> str:
        """The answer with every unverified citation number written ``n?``."""
        bad: dict[tuple[int, int], set[int]] = {}
        for c in self.flagged:
            bad.setdefault(c.marker, set()).add(c.number)
        text = self.text
        for (a, b), numbers_ in sorted(bad.items(), reverse=True):
            text = text[:a] + _mark(text[a:b], numbers_) + text[b:]
        return text

    def to_json(self) -> dict[str, Any]:
        """A plain dict for the API: answer, citations with their check, sources."""
        return {
            "question": self.question, "query": self.query, "answer": self.text,
            "marked_answer": self.marked_text(),
            "citations": [{**asdict(c), "marker": list(c.marker)} for c in self.citations],
            "sources": [asdict(s) for s in self.sources],
            "uncited": self.uncited,
            "retrieval": (self.retrieval or Queries(self.query)).to_json(),
            "extracted": [asdict(e) for e in self.extracted],
        }


def _mark(marker: str, flagged: set[int]) -> str:
    """``[1, 2]`` with the flagged numbers written ``2?``."""
    return re.sub(r"\d+", lambda m: m.group() + ("?" if int(m.group()) in flagged else ""),
                  marker)


def build_messages(question: str, sources: list[Source],
                   system: str | None = None) -> list[dict[str, Any]]:
    """The chat messages that ask the model for a cited answer."""
    user = render_prompt("rag_answer.jinja", question=question, passages=sources)
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": user}]


def verify(text: str, sources: list[Source]) -> tuple[list[Citation], list[str]]:
    """Check every citation in ``text`` against ``sources``; also return the
    sentences that cite nothing but state something (3+ content words)."""
    by_number = {s.number: s for s in sources}
    citations: list[Citation] = []
    previous = 0
    for group in _GROUP.finditer(text):
        claim = _claim(text, group.start(), previous)
        previous = group.end()
        cited = [int(n) for n in re.findall(r"\d+", group.group())]
        for number in dict.fromkeys(cited):
            ok, reason = _check(claim, number, cited, by_number)
            citations.append(Citation(number, claim, ok, reason, group.span()))
    return citations, _uncited(text)


def _claim(text: str, marker_start: int, previous_end: int) -> str:
    """The words a marker vouches for: back to the start of its sentence (a
    marker right after a full stop belongs to the sentence before it), but
    not past the previous marker."""
    head = text[:marker_start].rstrip()
    search_end = len(head) - 1 if head.endswith((".", "!", "?")) else len(head)
    start = 0
    for match in _SENTENCE_BREAK.finditer(text, 0, max(search_end, 0)):
        start = match.end()
    start = max(start, previous_end)
    return _GROUP.sub("", text[start:marker_start]).strip()


def _check(claim: str, number: int, group: list[int],
           sources: dict[int, Source]) -> tuple[bool, str]:
    """Whether passage ``number`` supports ``claim``. A claim cited to several
    passages at once ([1][2]) may be split between them: then the passages
    together must cover it, and this one must share at least one key word."""
    source = sources.get(number)
    if source is None:
        given = f"1-{len(sources)}" if sources else "none"
        return False, f"there is no passage [{number}] (passages given: {given})"
    key = set(content_words(claim))
    if not key:
        return False, "the cited text has no content words to check"
    passage = set(content_words(_searchable(source)))
    shared = key & passage
    together = [sources[n] for n in group if n in sources]
    covered = key & set().union(*(content_words(_searchable(s)) for s in together))
    missing_numbers = numbers(claim) - set().union(*(numbers(_searchable(s)) for s in together))
    if missing_numbers:
        return False, f"passage [{number}] does not contain {', '.join(sorted(missing_numbers))}"
    if shared and len(covered) / len(key) >= SUPPORT:
        return True, f"passage [{number}] shares {len(shared)} of {len(key)} key words"
    absent = ", ".join(sorted(key - passage)[:8])
    return False, (f"passage [{number}] shares only {len(shared)} of {len(key)} key words "
                   f"(missing: {absent})")


def _searchable(source: Source) -> str:
    return f"{source.heading}\n{source.text}"


def _uncited(text: str) -> list[str]:
    found = []
    start = 0
    for match in [*_SENTENCE_BREAK.finditer(text), None]:
        end = match.end() if match else len(text)
        sentence = text[start:end].strip()
        start = end
        follows = _GROUP.match(text[end:].lstrip()) if match else None
        if sentence and not _GROUP.search(sentence) and not follows \
                and len(content_words(sentence)) >= 3:
            found.append(sentence)
    return found


@dataclass(slots=True)
class Prepared:
    """Everything decided before the model answers: the query retrieval used,
    the sources that fit the context window, and the messages to send."""

    question: str
    query: str
    sources: list[Source]
    messages: list[dict[str, Any]]
    retrieval: Queries | None = None
    """Every query retrieval used (the query alone when None)."""

    @property
    def queries(self) -> list[str]:
        return self.retrieval.used if self.retrieval else [self.query]

    @property
    def prompt(self) -> str:
        """The last user message: the rendered passages and question."""
        return str(self.messages[-1]["content"])


def finish(prepared: Prepared, text: str) -> Answer:
    """The model's ``text`` for ``prepared``, with every citation checked."""
    citations, uncited = verify(text, prepared.sources)
    asked = " ".join(dict.fromkeys([prepared.question, prepared.query]))
    extracted = [] if citations else extract(asked, prepared.sources)
    return Answer(prepared.question, prepared.query, text, prepared.sources, citations,
                  prepared.messages, uncited, prepared.retrieval, extracted)


def extract(question: str, sources: list[Source],
            passages: int = EXTRACT_PASSAGES) -> list[Extract]:
    """The sentence of each of the first ``passages`` sources that shares the
    most content words with ``question`` (the first such on a tie); a source
    with no sentence sharing any is skipped. Headings are not sentences."""
    wanted = set(content_words(question))
    found = []
    for source in sources[:passages]:
        best, best_score = None, 0
        for start, end in _sentences(source.text):
            score = len(wanted & set(content_words(source.text[start:end])))
            if score > best_score:
                best, best_score = (start, end), score
        if best is not None:
            a, b = best
            found.append(Extract(source.number, source.text[a:b], source.start + a,
                                 source.start + b))
    return found


def _sentences(text: str) -> list[tuple[int, int]]:
    """Spans of the sentences of ``text``, whitespace trimmed, headings
    (Markdown ``#`` lines) and list markers left out."""
    spans = []
    start = 0
    for match in [*_SENTENCE_BREAK.finditer(text), None]:
        end = match.end() if match else len(text)
        piece = text[start:end]
        start = end
        lead = len(piece) - len(piece.lstrip())
        body = piece.strip()
        if not body or body.startswith("#"):
            continue
        marker = re.match(r"(?:[-*+]|\d+[.)])\s+", body)
        skip = marker.end() if marker else 0
        a = end - len(piece) + lead + skip
        spans.append((a, a + len(body) - skip))
    return spans

"""The notebook and server API for documents: one object that holds a store
and the embedders its collections need.

    from lanner.rag import Library
    with Library.open() as library:                     # logs.db in the Lanner home
        library.ingest(["~/notes"], collection="notes")
        answer = library.answer(model, "When is the review?", collection="notes")
        print(answer.marked_text())
        for source in answer.cited:
            print(source.number, source.location)

Keep one ``Library`` for many questions (the server does): opening the
embedding model takes seconds, searching takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

from lanner.engine.model import Model
from lanner.engine.types import collect
from lanner.errors import ContextLengthExceeded, InvalidRequest
from lanner.rag.answer import Answer, Prepared, Source, build_messages, finish
from lanner.rag.embed import Embedder, open_embedder
from lanner.rag.ingest import IngestReport, Progress, ingest
from lanner.rag.rewrite import Queries, ask_rewriter, follow_up_queries
from lanner.rag.search import Hit, Mode, search
from lanner.rag.store import DEFAULT_COLLECTION, DocumentStore, no_such_collection, open_store


class Library:
    def __init__(self, store: DocumentStore,
                 embedder_factory: Callable[[str], Embedder] = open_embedder) -> None:
        self.store = store
        self._factory = embedder_factory
        self._embedders: dict[str, Embedder] = {}

    @classmethod
    def open(cls, location: str | Path | None = None, *,
             home: str | Path | None = None) -> Library:
        """The library in ``location`` (see ``open_store``; default: logs.db). The
        embedders it opens keep their ONNX exports in ``home`` too."""
        return cls(open_store(location, home=home), partial(open_embedder, home=home))

    # -- embedders ------------------------------------------------------------------

    def use_embedder(self, embedder: Embedder) -> None:
        """Reuse an already-open embedder for collections built with its spec."""
        self._embedders[embedder.spec] = embedder

    def embedder_for(self, collection: str) -> Embedder:
        """The embedder ``collection`` was built with (queries must use it)."""
        found = self.store.get_collection(collection)
        if found is None:
            raise no_such_collection(collection, [c.name for c in self.store.collections()])
        return self._embedder(found.embedder)

    def _embedder(self, spec: str) -> Embedder:
        if spec not in self._embedders:
            self._embedders[spec] = self._factory(spec)
        return self._embedders[spec]

    # -- collections -----------------------------------------------------------------

    def ingest(self, paths: Iterable[str | Path], collection: str = DEFAULT_COLLECTION, *,
               embedder: str | Embedder | None = None,
               progress: Callable[[Progress], None] | None = None,
               **chunking: Any) -> IngestReport:
        """Add files and folders to ``collection`` (created if new). A new
        collection uses ``embedder`` (default: the bundled model); an existing
        one keeps the embedder it was built with."""
        existing = self.store.get_collection(collection)
        if isinstance(embedder, str) or embedder is None:
            spec = embedder or (existing.embedder if existing else "bundled")
            chosen = self._embedder(spec)
        else:
            chosen = embedder
            self.use_embedder(embedder)
        return ingest(self.store, chosen, collection, paths, progress=progress, **chunking)

    def forget(self, collection: str, paths: Iterable[str | Path]) -> list[str]:
        """Remove these files' documents; returns the paths that were there."""
        removed = []
        for path in paths:
            key = str(Path(path).expanduser().resolve())
            if self.store.remove_document(collection, key):
                removed.append(key)
        return removed

    def forget_missing(self, collection: str) -> list[str]:
        """Remove the documents whose files no longer exist."""
        gone = [d.path for d in self.store.documents(collection) if not d.exists]
        return self.forget(collection, gone)

    # -- questions -----------------------------------------------------------------------

    def search(self, query: str | Sequence[str], collection: str = DEFAULT_COLLECTION, *,
               k: int = 5, mode: Mode = "hybrid") -> list[Hit]:
        """The ``k`` best chunks for ``query``; several queries are fused by RRF."""
        return search(self.store, self.embedder_for(collection), collection, query,
                      k=k, mode=mode)

    def known_words(self, collection: str, words: Sequence[str]) -> set[str]:
        """Those of ``words`` that the keyword index of ``collection`` matches."""
        return {w for w in words if self.store.keyword_search(collection, [w], 1)}

    def queries(self, model: Model, question: str, collection: str = DEFAULT_COLLECTION,
                history: Sequence[dict[str, Any]] = ()) -> Queries:
        """What to search for ``question``: for a follow-up (``history`` has an
        earlier question) the model's rewrite, if it passes its check, the
        follow-up as typed and the previous question (see ``rewrite``)."""
        reply = ask_rewriter(model, history, question)
        return follow_up_queries(reply, question, history,
                                 lambda words: self.known_words(collection, words))

    def prepare(self, model: Model, question: str, collection: str = DEFAULT_COLLECTION, *,
                k: int = 5, mode: Mode = "hybrid", history: Sequence[dict[str, Any]] = (),
                system: str | None = None, **sampling: Any) -> Prepared:
        """Retrieve ``k`` passages for the question's queries (see ``queries``),
        fused, and build the messages; passages are dropped from the end until
        the prompt and ``max_tokens`` fit the context."""
        if not question.strip():
            raise InvalidRequest("question", "must not be empty")
        self.embedder_for(collection)  # an unknown collection fails before the rewriter runs
        queries = self.queries(model, question, collection, history)
        hits = self.search(queries.used, collection, k=k, mode=mode)
        sources = [Source.from_hit(i, hit) for i, hit in enumerate(hits, 1)]
        head = [m for m in history if system is None or m.get("role") != "system"]
        while True:
            messages = [*head, *build_messages(question, sources, system)]
            try:
                model.chat_request(messages, strict_context=True, **sampling)
            except ContextLengthExceeded:
                if not sources:
                    raise
                sources = sources[:-1]
                continue
            return Prepared(question, queries.primary, sources, messages, queries)

    def answer(self, model: Model, question: str, collection: str = DEFAULT_COLLECTION, *,
               k: int = 5, mode: Mode = "hybrid", history: Sequence[dict[str, Any]] = (),
               system: str | None = None, **sampling: Any) -> Answer:
        """A cited answer with every citation checked (see ``lanner.rag.answer``)."""
        prepared = self.prepare(model, question, collection, k=k, mode=mode,
                                history=history, system=system, **sampling)
        text = collect(model.chat_stream(prepared.messages, **sampling)).text
        return finish(prepared, text)

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def answer(model: Model, question: str, *, collection: str = DEFAULT_COLLECTION, k: int = 5,
           messages: Sequence[dict[str, Any]] = (), location: str | Path | None = None,
           home: str | Path | None = None, **sampling: Any) -> Answer:
    """One cited answer from a collection (opens and closes a ``Library``;
    keep a ``Library`` open instead when answering many questions)."""
    with Library.open(location, home=home) as library:
        return library.answer(model, question, collection, k=k, history=messages, **sampling)

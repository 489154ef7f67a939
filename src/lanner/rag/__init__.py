"""Answers from your own documents, with citations that are checked.

    from lanner.rag import Library
    with Library.open() as library:
        library.ingest(["docs/"], collection="docs")
        answer = library.answer(model, "How do I reset it?", collection="docs")

Pieces, bottom up: ``loaders`` (files -> page text), ``chunking`` (text ->
chunks with exact character spans), ``embed`` (sentence-transformers or a
remote ``/v1/embeddings``), ``store_sqlite`` / ``store_pg`` (the two stores),
``terms`` (the keyword index's words, the same on both stores), ``search``
(vector, keyword, hybrid by reciprocal rank fusion), ``rewrite``
(follow-up -> checked rewrite, follow-up and previous question, fused),
``answer`` (prompt, citation checks, sentences extracted for an uncited answer),
``library`` (all of it behind one object). Importing this package never
imports torch: the embedding model loads on first use.
"""

from lanner.rag.answer import Answer, Citation, Prepared, Source, finish, verify
from lanner.rag.ingest import IngestReport
from lanner.rag.library import Library, answer
from lanner.rag.search import Hit, search
from lanner.rag.store import DEFAULT_COLLECTION, open_store

__all__ = [
    "DEFAULT_COLLECTION", "Answer", "Citation", "Hit", "IngestReport", "Library", "Prepared",
    "Source", "answer", "finish", "open_store", "search", "verify",
]

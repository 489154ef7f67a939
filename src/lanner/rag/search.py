"""Retrieval: vector search, keyword search, and both fused by reciprocal
rank fusion (RRF).

RRF scores a chunk by ``sum(1 / (RRF_K + rank))`` over the rankings it
appears in (rank from 1). It needs no score calibration between BM25 and
cosine similarity, which is why hybrid search uses it: a passage only one
method finds still ranks, and one both find ranks first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lanner.errors import InvalidRequest
from lanner.rag.embed import Embedder
from lanner.rag.store import DocumentStore, StoredChunk
from lanner.rag.text import keyword_terms

Mode = Literal["hybrid", "vector", "keyword"]
MODES: tuple[Mode, ...] = ("hybrid", "vector", "keyword")
RRF_K = 60
"""The constant from Cormack et al. (2009): damps the weight of the top ranks."""
CANDIDATES = 50
"""How many chunks each method contributes to the fusion."""


@dataclass(frozen=True, slots=True)
class Hit:
    chunk: StoredChunk
    score: float
    """RRF score (hybrid, or several queries), cosine similarity (vector) or
    relevance (keyword)."""
    vector_rank: int | None = None
    """1-based rank in the vector results (the best over several queries),
    None if not among them."""
    keyword_rank: int | None = None


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Fuse rankings of ids (best first) into (id, score), best first; ties
    keep the order in which ids were first seen."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda pair: -pair[1])


def search(store: DocumentStore, embedder: Embedder, collection: str,
           query: str | Sequence[str], *, k: int = 5, mode: Mode = "hybrid",
           candidates: int = CANDIDATES) -> list[Hit]:
    """The ``k`` best chunks of ``collection`` for ``query``. Several queries
    (a follow-up, its rewrite, the previous question) are each searched and
    all their rankings fused by RRF, all weighing the same; the ranks kept
    in a hit are its best."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidRequest("k", f"must be a positive integer, got {k!r}")
    if mode not in MODES:
        raise InvalidRequest("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    queries = [query] if isinstance(query, str) else list(query)
    if not queries:
        raise InvalidRequest("query", "needs at least one query")
    fusing = mode == "hybrid" or len(queries) > 1
    depth = max(k, candidates) if fusing else k
    vectors: list[list[tuple[int, float]]] = []
    keywords: list[list[tuple[int, float]]] = []
    if mode in ("hybrid", "vector"):
        vectors = [store.vector_search(collection, v, depth) for v in embedder.embed(queries)]
    if mode in ("hybrid", "keyword"):
        keywords = [store.keyword_search(collection, keyword_terms(q), depth) for q in queries]
    if fusing:
        ranked = rrf([[i for i, _ in ranking] for ranking in [*vectors, *keywords]])[:k]
    else:
        ranked = (vectors or keywords)[0][:k]
    return _hits(store, ranked, vectors, keywords)


def _hits(store: DocumentStore, ranked: list[tuple[int, float]],
          vectors: list[list[tuple[int, float]]],
          keywords: list[list[tuple[int, float]]]) -> list[Hit]:
    vrank, krank = _best_ranks(vectors), _best_ranks(keywords)
    chunks = {c.id: c for c in store.get_chunks([cid for cid, _ in ranked])}
    return [Hit(chunks[cid], score, vrank.get(cid), krank.get(cid))
            for cid, score in ranked if cid in chunks]


def _best_ranks(rankings: list[list[tuple[int, float]]]) -> dict[int, int]:
    best: dict[int, int] = {}
    for ranking in rankings:
        for rank, (cid, _) in enumerate(ranking, 1):
            best[cid] = min(rank, best.get(cid, rank))
    return best

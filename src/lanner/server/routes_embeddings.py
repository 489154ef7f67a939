"""``POST /v1/embeddings``: unit vectors for texts, from the bundled MiniLM.

The official client asks for ``encoding_format="base64"`` by default: the
vector as little-endian float32 bytes, base64-encoded, which it decodes itself.
"""

from __future__ import annotations

import asyncio
import base64
import struct

from fastapi import APIRouter, Request

from lanner.errors import InvalidRequest, ModelNotFound
from lanner.server import protocol as p
from lanner.server.serving import state_of

router = APIRouter()

MAX_INPUTS = 2048
"""OpenAI's limit on inputs per request."""


def _texts(body: p.EmbeddingRequest) -> list[str]:
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise InvalidRequest("input", "must not be empty")
    if len(texts) > MAX_INPUTS:
        raise InvalidRequest("input", f"at most {MAX_INPUTS} inputs per request, got {len(texts)}")
    out: list[str] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidRequest("input", "token id arrays are not supported; send text")
        if not text:
            raise InvalidRequest("input", f"input[{i}] is an empty string")
        out.append(text)
    return out


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


@router.post("/v1/embeddings", response_model=p.EmbeddingList)
async def embeddings(body: p.EmbeddingRequest, http: Request) -> p.EmbeddingList:
    """Creates an embedding vector representing the input text."""
    state = state_of(http)
    embedder = state.embedder
    if embedder is None or not embedder.accepts(body.model):
        served = embedder.name if embedder else "none"
        raise ModelNotFound(f"the embedding model {body.model!r} does not exist on this "
                            f"server (served: {served})")
    texts = _texts(body)
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise InvalidRequest("dimensions", f"{embedder.name} gives {embedder.dimensions} "
                             "dimensions and cannot shorten them")
    vectors, tokens = await asyncio.to_thread(embedder.embed, texts)
    state.metrics.count_tokens(embedder.name, tokens, 0)
    data = [p.Embedding(index=i, embedding=_encode(v, body.encoding_format))
            for i, v in enumerate(vectors)]
    return p.EmbeddingList(model=embedder.name, data=data,
                           usage=p.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

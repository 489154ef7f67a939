"""``POST /v1/completions``: OpenAI's legacy text completion, kept because
evaluation tools use it: ``echo`` with ``logprobs`` scores the prompt itself.

Choices are ordered prompt by prompt, ``n`` per prompt, as OpenAI orders them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import Response

from lanner.engine.model import Model
from lanner.engine.types import Event, Finish, TextDelta, Token
from lanner.engine.types import Request as GenRequest
from lanner.errors import ContextLengthExceeded
from lanner.server import protocol as p
from lanner.server.serving import (
    ClientGone,
    Run,
    collect,
    completion_tokens,
    finish_reason,
    first_event,
    prompt_tokens,
    start_run,
    state_of,
)
from lanner.server.sse import DONE, EventStreamResponse, event, guarded

router = APIRouter()


def build_requests(model: Model, body: p.CompletionRequest) -> list[GenRequest]:
    options = p.completion_options(body)
    out = []
    for prompt in _prompts(body):
        try:
            request = model.completion_request(prompt, strict_context=True, **options)
        except ContextLengthExceeded as exc:
            exc.param = "prompt"
            raise
        out += [dataclasses.replace(request, seed=p.choice_seed(request.seed, i))
                for i in range(body.n)]
    return out


def _prompts(body: p.CompletionRequest) -> list[str]:
    return [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)


def prompt_logprobs(model: Model, prompt: str, ids: Sequence[int], top: int) -> list[Token]:
    """Each prompt token with log P(token | the tokens before it); the BOS the
    model adds is left out (it is not part of the echoed text).

    Uses the backend's ``prompt_logprobs(ids, top)`` (llama.cpp and
    transformers: one forward pass, one Token per id, with the ``top``
    alternatives). A backend without it falls back on ``loglikelihood(context,
    token)`` per token: one scoring pass per token, no alternatives, and exact
    where the prefix's text tokenizes back to the same ids; tokens holding part
    of a character get None. The first token, which has no context of its own,
    gets None, as in OpenAI's answers.
    """
    backend = model.backend
    skip = len(ids) - len(backend.tokenize(prompt, add_bos=False))
    scorer = getattr(backend, "prompt_logprobs", None)
    if scorer is not None:
        scored: list[Token] = scorer(ids, top)
        return scored[skip:]
    body = list(ids[skip:])
    out: list[Token] = []
    for k, token_id in enumerate(body):
        text = backend.detokenize([token_id])
        # No context yet, or a token holding part of a character (its text
        # would not tokenize back to it): nothing loglikelihood can score.
        scorable = k > 0 and text != "" and "\ufffd" not in text
        logprob = backend.loglikelihood(backend.detokenize(body[:k]), text)[0] if scorable \
            else None
        out.append(Token(token_id, text, logprob))
    return out


@router.post("/v1/completions", response_model=p.Completion,
             responses={200: {"content": {"text/event-stream": {}}}})
async def completions(body: p.CompletionRequest, http: Request) -> Any:
    """Creates a completion for the provided prompt."""
    state = state_of(http)
    run = await start_run(state, body.model, len(_prompts(body)) * body.n,
                          lambda model: build_requests(model, body), "cmpl")
    echoes = await _echoes(run, body)
    if body.stream:
        try:
            events = await first_event(run, http)
        except ClientGone:
            return Response(status_code=499)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(guarded(_sse(run, body, events, echoes, include_usage),
                                           f"completion stream {run.id}"),
                                   on_close=run.streams.close)
    try:
        results = await collect(run, http)
    except ClientGone:
        return Response(status_code=499)
    choices = []
    for i, r in enumerate(results):
        echo_text, echo_tokens = echoes[i // body.n]
        lp = None
        if body.logprobs is not None:
            lp = _joined(p.completion_logprobs(echo_tokens, 0),
                         p.completion_logprobs(r.tokens, len(echo_text)))
        choices.append(p.CompletionChoice(index=i, text=echo_text + r.text, logprobs=lp,
                                          finish_reason=finish_reason(r)))
    completion = completion_tokens(results)
    return p.Completion(id=run.id, created=run.created, model=run.model,
                        system_fingerprint=run.fingerprint, choices=choices,
                        usage=_usage(run, body.n, completion))


def _joined(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {key: a[key] + b[key] for key in a}


async def _echoes(run: Run, body: p.CompletionRequest) -> list[tuple[str, list[Token]]]:
    """Per prompt: the text to echo and its scored tokens ("" and [] without echo)."""
    if not body.echo:
        return [("", []) for _ in _prompts(body)]
    out = []
    for k, prompt in enumerate(_prompts(body)):
        tokens: list[Token] = []
        if body.logprobs is not None:
            # completion_request always tokenizes: the prompt is token ids here.
            ids = cast(Sequence[int], run.requests[k * body.n].prompt)
            try:
                tokens = await asyncio.to_thread(prompt_logprobs, run.loaded, prompt, ids,
                                                 body.logprobs)
            except BaseException:
                run.streams.close()
                raise
        out.append((prompt, tokens))
    return out


def _usage(run: Run, n: int, completion: int) -> p.Usage:
    prompt = prompt_tokens(run.requests, n)
    return p.Usage(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion)


async def _sse(
    run: Run, body: p.CompletionRequest, events: AsyncIterator[tuple[int, Event]],
    echoes: list[tuple[str, list[Token]]], include_usage: bool,
) -> AsyncIterator[bytes]:
    head = {"id": run.id, "object": "text_completion", "created": run.created,
            "model": run.model, "system_fingerprint": run.fingerprint}
    if include_usage:
        head["usage"] = None
    offsets = [len(echoes[i // body.n][0]) for i in range(len(run.requests))]
    completion = 0
    wants_lp = body.logprobs is not None
    if body.echo:
        for i in range(len(run.requests)):
            text, tokens = echoes[i // body.n]
            lp = p.completion_logprobs(tokens, 0) if wants_lp else None
            yield event({**head, "choices": [_choice(i, text, lp)]})
    async for index, ev in events:
        if isinstance(ev, TextDelta) and (ev.text or (wants_lp and ev.tokens)):
            lp = p.completion_logprobs(ev.tokens, offsets[index]) if wants_lp else None
            offsets[index] += len(ev.text)
            yield event({**head, "choices": [_choice(index, ev.text, lp)]})
        elif isinstance(ev, Finish):
            completion += ev.usage.completion_tokens
            reason = "length" if ev.reason == "length" else "stop"
            yield event({**head, "choices": [_choice(index, "", None, reason)]})
    if include_usage:
        yield event({**head, "choices": [], "usage": _usage(run, body.n, completion).model_dump()})
    yield DONE


def _choice(index: int, text: str, logprobs: dict[str, Any] | None = None,
            finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

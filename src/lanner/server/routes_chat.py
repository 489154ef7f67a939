"""``POST /v1/chat/completions``: messages in, the assistant's answer out, whole
or streamed as ``chat.completion.chunk`` events."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from lanner.engine.model import Model
from lanner.engine.types import Event, Finish, TextDelta
from lanner.engine.types import Request as GenRequest
from lanner.errors import LannerError
from lanner.server import protocol as p
from lanner.server.errors import error_body
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
from lanner.server.sse import DONE, EventStreamResponse, event

router = APIRouter()
log = logging.getLogger("lanner.server")


def build_requests(model: Model, body: p.ChatCompletionRequest) -> list[GenRequest]:
    """``n`` requests for one conversation (choice i uses seed + i)."""
    options = p.chat_options(body)
    request = model.chat_request(p.chat_messages(body), strict_context=True, **options)
    return [dataclasses.replace(request, seed=p.choice_seed(request.seed, i))
            for i in range(body.n)]


@router.post("/v1/chat/completions", response_model=p.ChatCompletion,
             responses={200: {"content": {"text/event-stream": {}}}})
async def chat_completions(body: p.ChatCompletionRequest, http: Request) -> Any:
    """Creates a model response for the given chat conversation."""
    state = state_of(http)
    run = await start_run(state, body.model, body.n,
                          lambda model: build_requests(model, body), "chatcmpl")
    if body.stream:
        try:
            events = await first_event(run, http)
        except ClientGone:
            return Response(status_code=499)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(_sse(run, events, body.logprobs, include_usage),
                                   on_close=run.streams.close)
    try:
        results = await collect(run, http)
    except ClientGone:
        return Response(status_code=499)
    choices = [
        p.ChatChoice(index=i, message=p.ChoiceMessage(content=r.text),
                     logprobs=p.chat_logprobs(r.tokens) if body.logprobs else None,
                     finish_reason=finish_reason(r))
        for i, r in enumerate(results)
    ]
    return p.ChatCompletion(id=run.id, created=run.created, model=run.model,
                            system_fingerprint=run.fingerprint, choices=choices,
                            usage=_usage(run, completion_tokens(results)))


def _usage(run: Run, completion: int) -> p.Usage:
    prompt = prompt_tokens(run.requests, len(run.requests))
    return p.Usage(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion)


async def _sse(
    run: Run, events: AsyncIterator[tuple[int, Event]], logprobs: bool, include_usage: bool,
) -> AsyncIterator[bytes]:
    """The chunk stream: per choice a role chunk, content chunks and a finish
    chunk; then the usage chunk if asked for; then [DONE]."""
    head = {"id": run.id, "object": "chat.completion.chunk", "created": run.created,
            "model": run.model, "system_fingerprint": run.fingerprint}
    if include_usage:
        head["usage"] = None
    begun: set[int] = set()
    completion = 0
    try:
        async for index, ev in events:
            if index not in begun:
                begun.add(index)
                yield event({**head, "choices": [_choice(index, {"role": "assistant",
                                                                 "content": ""})]})
            if isinstance(ev, TextDelta) and (ev.text or (logprobs and ev.tokens)):
                lp = p.chat_logprobs(ev.tokens) if logprobs else None
                yield event({**head, "choices": [_choice(index, {"content": ev.text}, lp)]})
            elif isinstance(ev, Finish):
                completion += ev.usage.completion_tokens
                reason = "length" if ev.reason == "length" else "stop"
                yield event({**head, "choices": [_choice(index, {}, None, reason)]})
    except LannerError as exc:
        yield event(error_body(str(exc), type=exc.error_type, param=exc.param, code=exc.code))
        return
    except Exception:  # a bug: log it, tell the client the stream broke
        log.exception("chat stream %s failed", run.id)
        yield event(error_body("internal server error (see the server log)",
                               type="server_error"))
        return
    if include_usage:
        yield event({**head, "choices": [], "usage": _usage(run, completion).model_dump()})
    yield DONE


def _choice(
    index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None = None,
    finish: str | None = None,
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

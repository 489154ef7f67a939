"""``POST /v1/chat/completions``: messages in, the assistant's answer out, whole
or streamed as ``chat.completion.chunk`` events; with tools, the answer's calls
as ``message.tool_calls`` / ``delta.tool_calls`` (see ``tool_calls.py``); with
``collection``, a cited answer from documents (see ``documents.py``)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from lanner.chat.toolcalls import ToolSyntax, syntax_for
from lanner.engine.model import Model
from lanner.engine.types import Completion, Event, Finish, TextDelta, Token
from lanner.engine.types import Request as GenRequest
from lanner.rag.answer import Prepared
from lanner.server import protocol as p
from lanner.server.chatlog import TurnRecorder
from lanner.server.documents import cited
from lanner.server.serving import (
    ClientGone,
    Run,
    ServerState,
    collect,
    completion_tokens,
    finish_reason,
    first_event,
    fold,
    prompt_tokens,
    start_run,
    state_of,
)
from lanner.server.sse import DONE, EventStreamResponse, event, guarded
from lanner.server.tool_calls import (
    ChoiceStreams,
    ToolChoice,
    split_answer,
    tool_choice,
    tools_request,
)

router = APIRouter()


def build_requests(model: Model, body: p.ChatCompletionRequest,
                   tools: ToolChoice | None = None) -> list[GenRequest]:
    """``n`` requests for one conversation (choice i uses seed + i)."""
    options = p.chat_options(body)
    messages = p.chat_messages(body)
    if tools is None:
        request = model.chat_request(messages, strict_context=True, **options)
    else:
        request = tools_request(model, messages, tools, options)
    return [dataclasses.replace(request, seed=p.choice_seed(request.seed, i))
            for i in range(body.n)]


@router.post("/v1/chat/completions", response_model=p.ChatCompletion,
             responses={200: {"content": {"text/event-stream": {}}}})
async def chat_completions(body: p.ChatCompletionRequest, http: Request) -> Any:
    """Creates a model response for the given chat conversation."""
    state = state_of(http)
    tools = tool_choice(body)  # checked before any model work
    if body.collection is not None:
        return await _documents_answer(state, body, http)
    run = await start_run(state, body.model, body.n,
                          lambda model: build_requests(model, body, tools), "chatcmpl")
    syntax = syntax_for(run.loaded.chat_format) if tools and tools.parses else None
    parallel = tools is None or tools.parallel
    recorder = _recorder(state, body, run)
    if body.stream:
        try:
            events = await first_event(run, http)
        except ClientGone:
            return Response(status_code=499)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        parsers = ChoiceStreams(syntax, parallel) if syntax else None
        sse = _sse(run, events, body.logprobs, include_usage, parsers, recorder)
        return EventStreamResponse(guarded(sse, f"chat stream {run.id}"),
                                   on_close=lambda: _closed(run, recorder))
    try:
        results = await collect(run, http)
    except ClientGone:
        return Response(status_code=499)
    if recorder is not None:
        recorder.completed(results[0])
        recorder.close()
    choices = [_chat_choice(i, r, body.logprobs, syntax, parallel)
               for i, r in enumerate(results)]
    return p.ChatCompletion(id=run.id, created=run.created, model=run.model,
                            system_fingerprint=run.fingerprint, choices=choices,
                            usage=_usage(run, completion_tokens(results)))


def _chat_choice(index: int, result: Completion, logprobs: bool, syntax: ToolSyntax | None,
                 parallel: bool) -> p.ChatChoice:
    """One whole choice; with tools offered, its text split into content and calls."""
    content: str | None = result.text
    calls = None
    if syntax is not None:
        content, calls = split_answer(syntax, result.text, parallel)
    return p.ChatChoice(index=index, message=p.ChoiceMessage(content=content, tool_calls=calls),
                        logprobs=p.chat_logprobs(result.tokens) if logprobs else None,
                        finish_reason="tool_calls" if calls else finish_reason(result))


async def _documents_answer(state: ServerState, body: p.ChatCompletionRequest,
                            http: Request) -> Any:
    """The ``collection`` extension: retrieve, answer, check every citation;
    streamed, the last choice chunk carries the ``citations`` (see ``_sse``)."""
    prepared: list[Prepared] = []

    def build(model: Model) -> list[GenRequest]:
        options = p.chat_options(body)
        prepared.append(state.documents.prepare(model, body, options))
        return [model.chat_request(prepared[0].messages, strict_context=True, **options)]

    run = await start_run(state, body.model, 1, build, "chatcmpl")
    recorder = _recorder(state, body, run)
    if body.stream:
        try:
            events = await first_event(run, http)
        except ClientGone:
            return Response(status_code=499)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        sse = _sse(run, events, body.logprobs, include_usage, recorder=recorder,
                   documents=prepared[0])
        return EventStreamResponse(guarded(sse, f"chat stream {run.id}"),
                                   on_close=lambda: _closed(run, recorder))
    try:
        (result,) = await collect(run, http)
    except ClientGone:
        return Response(status_code=499)
    answer = cited(prepared[0], result.text)
    if recorder is not None:
        recorder.completed(result, answer.marked_text(), answer.to_json())
        recorder.close()
    choice = p.ChatChoice(index=0, message=p.ChoiceMessage(content=answer.marked_text()),
                          logprobs=p.chat_logprobs(result.tokens) if body.logprobs else None,
                          finish_reason=finish_reason(result))
    return p.ChatCompletion(id=run.id, created=run.created, model=run.model,
                            system_fingerprint=run.fingerprint, choices=[choice],
                            usage=_usage(run, completion_tokens([result])),
                            citations=answer.to_json())


def _recorder(state: ServerState, body: p.ChatCompletionRequest, run: Run) -> TurnRecorder | None:
    """With ``conversation_id``: what logs choice 0 as a turn of that conversation."""
    if body.conversation_id is None:
        return None
    return TurnRecorder(state, body.conversation_id, run.loaded, run.requests[0],
                        p.chat_messages(body))


def _closed(run: Run, recorder: TurnRecorder | None) -> None:
    run.streams.close()
    if recorder is not None:
        recorder.close()


def _usage(run: Run, completion: int) -> p.Usage:
    prompt = prompt_tokens(run.requests, len(run.requests))
    return p.Usage(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion)


async def _sse(
    run: Run, events: AsyncIterator[tuple[int, Event]], logprobs: bool, include_usage: bool,
    parsers: ChoiceStreams | None = None, recorder: TurnRecorder | None = None,
    documents: Prepared | None = None,
) -> AsyncIterator[bytes]:
    """The chunk stream: per choice a role chunk, content (and tool-call) chunks
    and a finish chunk; then the usage chunk if asked for; then [DONE].

    With ``documents`` (one choice) the finish chunk also carries ``citations``,
    the same object a whole response has: the answer's citations checked once
    it is complete, ``marked_answer`` its text with unverified ones as ``[n?]``.
    """
    head = {"id": run.id, "object": "chat.completion.chunk", "created": run.created,
            "model": run.model, "system_fingerprint": run.fingerprint}
    if include_usage:
        head["usage"] = None
    chunks = _Chunks(logprobs, parsers)
    answer = Completion(text="")
    completion = 0
    async for index, ev in events:
        if recorder is not None:
            recorder.feed(index, ev)
        extra: dict[str, Any] = {}
        if documents is not None:
            fold(answer, ev)
            if isinstance(ev, Finish):
                extra = {"citations": _checked(documents, answer, recorder)}
        for choice in chunks.of(index, ev):
            yield event({**head, "choices": [choice],
                         **(extra if choice["finish_reason"] else {})})
        if isinstance(ev, Finish):
            completion += ev.usage.completion_tokens
    if include_usage:
        yield event({**head, "choices": [], "usage": _usage(run, completion).model_dump()})
    yield DONE


def _checked(prepared: Prepared, result: Completion,
             recorder: TurnRecorder | None) -> dict[str, Any]:
    """A streamed documents answer's citations, checked; logged as a whole
    response's are (the marked text and the citations)."""
    answer = cited(prepared, result.text)
    if recorder is not None:
        recorder.completed(result, answer.marked_text(), answer.to_json())
    return answer.to_json()


class _Chunks:
    """Engine events of each choice as the ``choices`` entries of chunks.

    With ``parsers`` (tools offered) text goes through the choice's tool-call
    parser, which may hold some back; the tokens of held text ride on the next
    chunk that is sent, so logprobs still cover every token once.
    """

    def __init__(self, logprobs: bool, parsers: ChoiceStreams | None) -> None:
        self._logprobs = logprobs
        self._parsers = parsers
        self._begun: set[int] = set()
        self._held: dict[int, list[Token]] = {}

    def of(self, index: int, ev: Event) -> list[dict[str, Any]]:
        out = []
        if index not in self._begun:
            self._begun.add(index)
            out.append(_choice(index, {"role": "assistant", "content": ""}))
        if isinstance(ev, TextDelta):
            out += self._text(index, ev)
        elif isinstance(ev, Finish):
            out += self._finish(index, ev)
        return out

    def _text(self, index: int, ev: TextDelta) -> list[dict[str, Any]]:
        if self._parsers is None:
            if not (ev.text or (self._logprobs and ev.tokens)):
                return []
            return [_choice(index, {"content": ev.text}, self._lp(list(ev.tokens)))]
        self._held.setdefault(index, []).extend(ev.tokens)
        return [_choice(index, d, self._lp(self._held.pop(index, [])))
                for d in self._parsers.feed(index, ev.text)]

    def _finish(self, index: int, ev: Finish) -> list[dict[str, Any]]:
        out = []
        reason = "length" if ev.reason == "length" else "stop"
        if self._parsers is not None:
            out = [_choice(index, d, self._lp(self._held.pop(index, [])))
                   for d in self._parsers.finish(index)]
            reason = "tool_calls" if self._parsers.called(index) else reason
        held = self._held.pop(index, [])
        out.append(_choice(index, {}, self._lp(held) if held else None, reason))
        return out

    def _lp(self, tokens: list[Token]) -> dict[str, Any] | None:
        return p.chat_logprobs(tokens) if self._logprobs else None


def _choice(
    index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None = None,
    finish: str | None = None,
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

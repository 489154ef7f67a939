"""The bounded tool loop: ask the model, run the tools it calls, feed the
results back, until it answers (or ``max_steps`` rounds of calls are used up).

    from lanner.tools import run_tools, tool

    @tool
    def sums(a: int, b: int) -> int:
        "Add two whole numbers."
        return a + b

    result = run_tools(model, "What is 2 + 3? Use the sums tool.", [sums])
    result.answer      # the final text
    result.messages    # the whole conversation, tool calls and results included

The tool-call syntax comes from the model's ChatFormat (see
``lanner.chat.toolcalls``). Every model call is logged when a Store is given:
the answer as the user-facing turn, each step as a sub-call (``parent_id``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lanner.chat.calllog import CallLog
from lanner.chat.prompts import render_prompt
from lanner.chat.toolcalls import (
    ContentDelta,
    StreamParser,
    ToolCall,
    ToolCallDelta,
    ToolSyntax,
    split_stream,
    syntax_for,
)
from lanner.engine.model import Model, make_request
from lanner.engine.types import Finish, Request, TextDelta
from lanner.errors import InvalidRequest
from lanner.store import Store
from lanner.tools.schema import Tool, make_tool

DEFAULT_MAX_STEPS = 5


@dataclass(frozen=True)
class ToolCallEvent:
    """The model asked for this call; it is about to run."""

    call: ToolCall


@dataclass(frozen=True)
class ToolResultEvent:
    """A call ran; ``result`` is the text the model will read."""

    call: ToolCall
    result: str


LoopEvent = TextDelta | ToolCallEvent | ToolResultEvent | Finish


@dataclass
class ToolLoopResult:
    answer: str
    messages: list[dict[str, Any]]
    """The conversation given, plus every call, result and the final answer."""
    calls: list[ToolCall] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    steps: int = 0
    """Rounds of tool calls made."""
    stopped: Literal["answer", "max_steps", "repeated"] = "answer"
    """Why the loop ended: the model answered; or it used up ``max_steps`` rounds,
    or repeated a call it had made before, and was then asked to answer from
    the results (see ``_final_question``)."""
    turn_id: int | None = None


class ToolLoop:
    """One model with a set of tools. ``stream`` yields what happens; ``run``
    collects it. ``options`` are sampling options (as for ``Model.chat``)."""

    def __init__(self, model: Model, tools: Sequence[Callable[..., Any] | Tool], *,
                 max_steps: int = DEFAULT_MAX_STEPS, store: Store | None = None,
                 conversation_id: str | None = None, syntax: ToolSyntax | None = None,
                 **options: Any) -> None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise InvalidRequest("max_steps", f"must be an integer >= 1, got {max_steps!r}")
        self.model = model
        self.tools = {t.name: t for t in (make_tool(f) for f in tools)}
        if not self.tools:
            raise InvalidRequest("tools", "give at least one tool")
        self.max_steps = max_steps
        self.store = store
        self.conversation_id = conversation_id
        self.syntax = syntax or syntax_for(model.chat_format)
        self.options = options
        self.result: ToolLoopResult | None = None

    def run(self, messages: list[dict[str, Any]] | str) -> ToolLoopResult:
        """Run to the end and return the result."""
        for _ in self.stream(messages):
            pass
        if self.result is None:  # stream() always sets it when it runs to the end
            raise InvalidRequest("messages", "the tool loop ended without a result")
        return self.result

    def stream(self, messages: list[dict[str, Any]] | str) -> Generator[LoopEvent, None, None]:
        """Content deltas of every step, each call and its result, then the
        final answer's Finish. ``self.result`` is set when the stream ends.
        Closed early (Ctrl-C), the calls made so far are still logged, the
        answer with finish reason "cancelled"."""
        history = [{"role": "user", "content": messages}] if isinstance(messages, str) \
            else list(messages)
        system = next((m["content"] for m in history[:1] if m["role"] == "system"), None)
        prompt = next((str(m["content"]) for m in reversed(history) if m["role"] == "user"), "")
        log = CallLog(self.model, self.store, self.conversation_id, system)
        result = ToolLoopResult(answer="", messages=history)
        try:
            finish = yield from self._rounds(log, result)
        finally:
            result.turn_id = log.commit(prompt, result.answer, history, "tools")
            self.conversation_id = log.conversation_id
        self.result = result
        if finish is not None:
            yield finish

    def _rounds(self, log: CallLog, result: ToolLoopResult,
                ) -> Generator[LoopEvent, None, Finish | None]:
        """Model calls and tool runs until an answer; fills ``result``."""
        schemas = [t.schema() for t in self.tools.values()]
        asked = result.messages
        ran: dict[tuple[str, str], str] = {}
        while True:
            content, calls, finish = yield from self._step(log, result.messages, schemas,
                                                           result.steps + 1)
            result.answer = content
            if not calls:
                break
            result.steps += 1
            result.messages = [*result.messages, _assistant(content, calls)]
            repeated = False
            for call in calls:
                key = (call.name, json.dumps(call.arguments_dict(), sort_keys=True))
                repeated = repeated or key in ran
                yield ToolCallEvent(call)
                # A call repeated word for word is not run again: it gets its result.
                text = ran[key] if key in ran else self._call(call)
                ran[key] = text
                result.calls.append(call)
                result.results.append(text)
                yield ToolResultEvent(call, text)
                result.messages = [*result.messages, _tool_message(call, text)]
            if repeated or result.steps >= self.max_steps:
                result.stopped = "max_steps" if result.steps >= self.max_steps else "repeated"
                content, _, finish = yield from self._step(
                    log, _final_question(asked, ran), None, result.steps + 1)
                result.answer = content
                break
        result.messages = [*result.messages, {"role": "assistant", "content": content}]
        return finish

    def _step(self, log: CallLog, messages: list[dict[str, Any]],
              tools: list[dict[str, Any]] | None, step: int,
              ) -> Generator[LoopEvent, None, tuple[str, list[ToolCall], Finish | None]]:
        """One model call; yields its content as it streams and returns
        (content, calls, finish)."""
        request = tool_request(self.model, self.syntax, messages, tools, **self.options)
        # Without tools on offer nothing is a call: the whole text is the answer.
        parser = self.syntax.stream() if tools else StreamParser()
        parts: list[str] = []
        calls: list[ToolCall] = []
        finish: Finish | None = None
        purpose = f"tool step {step}" if tools else "answer without tools"
        for item in split_stream(log.stream(request, messages, purpose), parser):
            if isinstance(item, ContentDelta):
                parts.append(item.text)
                yield TextDelta(item.text)
            elif isinstance(item, ToolCallDelta):
                calls.append(item.call)
            else:
                finish = item
        return "".join(parts).strip(), calls, finish

    def _call(self, call: ToolCall) -> str:
        tool = self.tools.get(call.name)
        if tool is None:
            return (f"Error: there is no tool named {call.name!r} "
                    f"(available: {', '.join(self.tools)})")
        return tool.call(call.arguments)


def run_tools(model: Model, messages: list[dict[str, Any]] | str,
              tools: Sequence[Callable[..., Any] | Tool], **kwargs: Any) -> ToolLoopResult:
    """The Python API: ``ToolLoop(model, tools, **kwargs).run(messages)``."""
    return ToolLoop(model, tools, **kwargs).run(messages)


def tool_request(model: Model, syntax: ToolSyntax, messages: list[dict[str, Any]],
                 tools: list[dict[str, Any]] | None, *, strict_context: bool = False,
                 **options: Any) -> Request:
    """Like ``Model.chat_request``, with ``tools`` offered in the model's syntax."""
    fmt = model.chat_format
    text = syntax.render(fmt, messages, tools)
    ids = model.backend.tokenize(text, add_bos=False, special=True)
    stop = tuple(dict.fromkeys([*(options.pop("stop", None) or ()), *fmt.stop]))
    request = make_request(ids, {**options, "stop": stop})
    model.check_context(len(ids), request.max_tokens if strict_context else None)
    return request


def _final_question(history: list[dict[str, Any]],
                    ran: dict[tuple[str, str], str]) -> list[dict[str, Any]]:
    """The conversation as given, its last user message followed by the results
    of every distinct call, and no tools on offer. Small models that are shown
    their calls and results in the template's tool syntax tend to call again
    rather than answer (Qwen2.5-Coder-0.5B does); in plain words they answer."""
    users = [i for i, m in enumerate(history) if m["role"] == "user"]
    last = users[-1] if users else len(history)  # no question: the results alone
    question = history[last]["content"] if users else ""
    results = [(name, arguments, text) for (name, arguments), text in ran.items()]
    content = render_prompt("tools_final_answer.jinja", question=question,
                            results=results).strip()
    return [*history[:last], {"role": "user", "content": content}, *history[last + 1:]]


def _assistant(content: str, calls: list[ToolCall]) -> dict[str, Any]:
    return {"role": "assistant", "content": content or None,
            "tool_calls": [c.to_openai() for c in calls]}


def _tool_message(call: ToolCall, text: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": text}

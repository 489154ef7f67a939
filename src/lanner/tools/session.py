"""A chat session whose model may call tools (``lanner chat --tools python``).

``send`` streams the final answer's text like ``ChatSession.send``; tool calls
and results go to ``on_event`` (the CLI prints them), and they stay in the
history so the next turn sees them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

from lanner.chat.session import ChatSession
from lanner.engine.types import Event, Finish, TextDelta
from lanner.tools.loop import DEFAULT_MAX_STEPS, LoopEvent, ToolLoop
from lanner.tools.schema import Tool


class ToolSession(ChatSession):
    """A ChatSession with tools; build it with ``with_tools``."""

    tools: Sequence[Tool] = ()
    max_steps: int = DEFAULT_MAX_STEPS
    on_event: Callable[[LoopEvent], None] | None = None

    @classmethod
    def with_tools(cls, session: ChatSession, tools: Sequence[Tool], *,
                   max_steps: int = DEFAULT_MAX_STEPS,
                   on_event: Callable[[LoopEvent], None] | None = None) -> ToolSession:
        """The same conversation (history, log, options), now with tools."""
        made = cls(session.model, session.store, system=session.system,
                   conversation_id=session.conversation_id, messages=session.messages,
                   options=session.options, on_drop=session.on_drop)
        made.tools, made.max_steps, made.on_event = tuple(tools), max_steps, on_event
        return made

    def send(self, text: str, **options: Any) -> Generator[Event, None, None]:
        messages = self.fit([*self.messages, {"role": "user", "content": text}],
                            {**self.options, **options})
        loop = ToolLoop(self.model, self.tools, max_steps=self.max_steps, store=self.store,
                        conversation_id=self.conversation_id, **{**self.options, **options})
        parts: list[str] = []
        try:
            for event in loop.stream(messages):
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                    yield event
                elif isinstance(event, Finish):
                    yield event
                else:
                    parts.clear()  # what came before a call is not the answer
                    if self.on_event is not None:
                        self.on_event(event)
        finally:
            if loop.result is not None:
                self.messages = loop.result.messages
            else:  # cut short: keep what was said so far
                self.messages = [*messages, {"role": "assistant", "content": "".join(parts)}]

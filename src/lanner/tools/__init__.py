"""Tools: Python functions the model may call, the bounded tool loop, the
sandboxed code interpreter and the shell agent.

    from lanner.tools import tool, run_tools
"""

from lanner.tools.loop import ToolLoop, ToolLoopResult, run_tools
from lanner.tools.schema import Tool, call, describe, make_tool, tool

__all__ = ["Tool", "ToolLoop", "ToolLoopResult", "call", "describe", "make_tool", "run_tools",
           "tool"]

"""Tool calls: the one documented format, parsed in one place, run with a timeout.

The format (the same one Hermes/Qwen-style chat models use, so demonstrations transfer)::

    <tool_call>{"name": "calc", "arguments": {"expression": "3*4"}}</tool_call>

JSON inside ``<tool_call>`` tags: ``name`` is a string, ``arguments`` an object. ``parse_tool_call``
returns None when the text holds no tool call (it is then an ordinary answer), a ``ToolCall`` when it
holds a valid one, and raises ``ToolCallError`` with a message written for the model otherwise; an
environment feeds that message back as the next observation.

``call_tool`` runs a tool function in a daemon thread and stops waiting after ``timeout_s``: an
exception or a hang becomes an error observation, never an exception in ``step``. A Python thread
cannot be killed, so a tool that hangs forever keeps its thread; tools should be quick and bounded
(the built-in ``calc`` bounds its own work), the timeout is the safety net.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["ToolCall", "ToolCallError", "ToolResult", "parse_tool_call", "format_tool_call", "call_tool",
           "OPEN_TAG", "CLOSE_TAG"]

OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"


class ToolCallError(ValueError):
    """A malformed tool call; the message says what was wrong and shows the right format."""


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolResult:
    output: str
    ok: bool  # False: the tool raised, timed out, was unknown or got bad arguments


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """The canonical text of a tool call (what experts write and the model should learn)."""
    return f"{OPEN_TAG}{json.dumps({'name': name, 'arguments': arguments})}{CLOSE_TAG}"


_EXAMPLE = format_tool_call("calc", {"expression": "3*4"})


def parse_tool_call(text: str) -> ToolCall | None:
    """The first tool call in ``text``; None if there is none; ``ToolCallError`` if it is malformed."""
    start = text.find(OPEN_TAG)
    if start < 0:
        if CLOSE_TAG in text:
            raise ToolCallError(f"found {CLOSE_TAG} without {OPEN_TAG}. Write {_EXAMPLE}")
        return None
    end = text.find(CLOSE_TAG, start)
    if end < 0:
        raise ToolCallError(f"{OPEN_TAG} is not closed by {CLOSE_TAG}. Write {_EXAMPLE}")
    body = text[start + len(OPEN_TAG):end].strip()
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:
        raise ToolCallError(f"the tool call is not valid JSON ({err.msg} at char {err.pos}). Write {_EXAMPLE}") from None
    except RecursionError:  # "[[[[..." deeper than the interpreter's recursion limit
        raise ToolCallError(f"the tool call's JSON is nested too deeply to read. Write {_EXAMPLE}") from None
    except ValueError as err:  # other decoding limits, e.g. an integer of more digits than Python converts
        raise ToolCallError(f"the tool call's JSON cannot be read ({str(err).split(';')[0][:160]}). Write {_EXAMPLE}") from None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ToolCallError(f'the tool call needs a "name" string. Write {_EXAMPLE}')
    arguments = data.get("arguments", {})
    if not isinstance(arguments, dict):
        raise ToolCallError(f'"arguments" must be a JSON object. Write {_EXAMPLE}')
    return ToolCall(data["name"], arguments)


def call_tool(call: ToolCall, functions: dict[str, Callable[..., Any]], timeout_s: float) -> ToolResult:
    """Run ``functions[call.name](**call.arguments)``; errors, bad arguments and timeouts become text."""
    fn = functions.get(call.name)
    if fn is None:
        known = ", ".join(sorted(functions)) or "none"
        return ToolResult(f"error: unknown tool {call.name!r}; available tools: {known}.", ok=False)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(**call.arguments)
        except TypeError as err:  # wrong or missing arguments
            box["error"] = f"bad arguments for {call.name}: {err}"
        except Exception as err:  # a tool's failure is an observation, not a crash
            box["error"] = f"{type(err).__name__}: {err}"

    worker = threading.Thread(target=target, name=f"tool-{call.name}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return ToolResult(f"error: tool {call.name!r} timed out after {timeout_s:g} s.", ok=False)
    if "error" in box:
        return ToolResult(f"error: {box['error']}"[:500], ok=False)
    return ToolResult(str(box.get("value"))[:1000], ok=True)

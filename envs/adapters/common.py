"""What the adapters share. What an adapter wraps, named in code or in a config: a class or factory, or the
text ``"module:Name"``; the rows (dataset) some adapters draw their tasks from: a list of dicts, or a JSONL
file; a row's chat prompt split into system and user text; the system prompt that lists the tools.

A wrong target or rows fail when the environment is made, with what was wrong and how to write it; the
message names the adapter, so a config with several of them says which one is broken.
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Any, Callable

from hybrid_rl.envs.core import TextEnv
from hybrid_rl.envs.tools import CLOSE_TAG, OPEN_TAG, ToolCall, ToolCallError, parse_tool_call


def resolve_target(target: Any, what: str) -> Callable[..., Any]:
    """``target`` itself when it is callable; ``"module:Name"`` imported; else ``ValueError`` naming the fix."""
    if callable(target):
        return target
    hint = f"give {what} a class or factory, or its import path as 'module:Name' (e.g. 'my_envs.wordle:WordleEnv')"
    if not isinstance(target, str) or target.count(":") != 1:
        raise ValueError(f"{what}={target!r} is not a target; {hint}.")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what}={target!r}: cannot import {module_name!r} ({err}); install the package that "
                         f"provides it or put its folder on PYTHONPATH.") from None
    obj = getattr(module, attr, None)
    if obj is None:
        close = difflib.get_close_matches(attr, [n for n in dir(module) if not n.startswith("_")], n=1)
        guess = f" Did you mean {module_name}:{close[0]}?" if close else ""
        raise ValueError(f"{what}={target!r}: module {module_name!r} has no {attr!r}.{guess}")
    if not callable(obj):
        raise ValueError(f"{what}={target!r} is a {type(obj).__name__}, not a class or factory; {hint}.")
    return obj


def load_rows(rows: Any, what: str) -> list[dict]:
    """``rows`` as a list of dicts: a list as it is; a path read as the dataset files are (``envs.dataset_files``):
    JSONL (one JSON object per line), .parquet or .csv, or a ``Dataset.save_to_disk`` folder. A record that is not
    an object is an error naming its line."""
    if rows is None:
        return []
    if isinstance(rows, (str, Path)):
        from hybrid_rl.envs.dataset_files import read_records

        try:
            records = list(read_records(rows))
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None
        out = []
        for where, record in records:
            if isinstance(record, Exception):
                raise ValueError(f"{what}: {where} is {record}; write one JSON object per line.")
            if not isinstance(record, dict):
                raise ValueError(f"{what}: {where} is a {type(record).__name__}, not an object; each row is one JSON "
                                 "object (a dict of the row's fields).")
            out.append(record)
        return out
    if not isinstance(rows, (list, tuple)) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{what} must be a list of dicts or the path of a JSONL, .parquet or .csv file, got "
                         f"{type(rows).__name__}.")
    return list(rows)


def split_prompt(prompt: Any) -> tuple[str, str]:
    """A row's prompt -> (system text, user text): plain text is the user's; chat messages are split by role
    (``system``/``developer`` and ``user``), a message's content is text or a list of ``{"text": ...}`` parts."""
    if not prompt:
        return "", ""
    if isinstance(prompt, str):
        return "", prompt
    by_role = lambda roles: "\n".join(_text(m.get("content")) for m in prompt if m.get("role") in roles)  # noqa: E731
    return by_role(("system", "developer")), by_role(("user",))


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def tools_prompt(tools: list[dict]) -> str:
    """The system prompt's tool list: each tool's call signature and description, then the call format."""
    if not tools:
        return ""
    lines = [f"- {signature(t)}: {t['description']}" if t.get("description") else f"- {signature(t)}" for t in tools]
    return "\n".join(["Tools:", *lines, f'Call one as {OPEN_TAG}{{"name": "{tools[0]["name"]}", "arguments": {{...}}}}'
                      f"{CLOSE_TAG}; reply without a tool call to finish."])


def signature(tool: dict) -> str:
    """``peek(digit: integer)`` from a tool spec's JSON schema."""
    args = ", ".join(f"{name}: {p.get('type', 'any')}" for name, p in tool.get("parameters", {}).get("properties", {}).items())
    return f"{tool['name']}({args})"


def system_prompt(system: str, tools: list[dict]) -> str | None:
    """The task's own system text, then the tool list (``tools_prompt``); None when both are empty."""
    return "\n".join(text for text in (system, tools_prompt(tools)) if text) or None


class ToolCallingEnv(TextEnv):
    """An adapted environment whose every reply is a tool call or the final answer: a malformed call is an
    invalid action answered as a tool message (the peers' tool-error turn); subclasses say what a call
    (``run_tool``) and an answer (``final_answer``) do."""

    def step_text(self, text: str):
        try:
            call = parse_tool_call(text)
        except ToolCallError as err:
            return self.result(f"error: {err}", {}, invalid=True, role="tool")
        return self.final_answer(text) if call is None else self.run_tool(call)

    def final_answer(self, text: str):
        raise NotImplementedError

    def run_tool(self, call: ToolCall):
        raise NotImplementedError

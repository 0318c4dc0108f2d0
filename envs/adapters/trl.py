"""TRL-style environments, unchanged: ``TRLEnv`` plays an object of the kind ``GRPOTrainer(environment_factory=...)``
takes: ``reset(**kwargs) -> str | None``, its public methods are the tools, an optional ``get_reward() -> float``::

    gymnasium.register("my/Vault-v0", entry_point="hybrid_rl.envs.adapters:TRLEnv",
                       kwargs={"factory": "my_envs.vault:Vault"}, max_episode_steps=8)

- One instance per gymnasium env, reset for every episode (TRL's "construct once, reset often").
- Tools are TRL's: the public methods of the class but ``reset`` and ``get_reward``. The model calls one in
  hybrid-rl's format (``<tool_call>{"name": "peek", "arguments": {"digit": 0}}</tool_call>``, ``envs.tools``);
  its return value is the next observation (role ``tool``). A malformed call, an unknown method, bad
  arguments, an exception in the method or a call that outlives ``tool_timeout_s`` is an invalid action
  whose observation says what was wrong and how to call the method; the episode goes on.
- The first answer without a tool call ends the episode, as in TRL; its reward is ``get_reward()`` (0 without
  one; an exception there is the env's error, so the episode is ``env_error``), success a positive reward.
- Rows: TRL's prompt comes from a dataset row and ``reset(**row)`` may append to it. ``rows`` (a list of dicts
  or a JSONL path) plays that part: the seed picks a row, ``reset`` gets its fields, and the first observation
  is the row's ``prompt`` (text, or chat messages: the user messages, a system message goes to the system
  prompt) followed by what ``reset`` returned. Every seed split draws from the same rows: give the eval
  its own file under another id.

Departures from TRL: the system prompt lists the tools (name, arguments, the docstring's first line) and
the call format, where TRL renders schemas with the chat template; ``reset`` also gets ``seed=`` when it
takes one (a ``seed`` parameter or ``**kwargs``), so a seed is the same episode everywhere; async methods
run to completion in the tool's thread; tool errors are flagged ``invalid_action`` (TRL only feeds them back).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from typing import Any, Callable

from hybrid_rl.envs.adapters.common import (ToolCallingEnv, load_rows, resolve_target, signature, split_prompt,
                                           system_prompt, tools_prompt)
from hybrid_rl.envs.tools import ToolCall, call_tool

__all__ = ["TRLEnv", "tool_methods", "tool_spec"]

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}
_JSON_TYPES.update({t.__name__: name for t, name in list(_JSON_TYPES.items())})  # string annotations too


class TRLEnv(ToolCallingEnv):
    """A TRL environment_factory environment: public methods are tools, get_reward() is the reward."""

    invalid_penalty = 0.0  # the reward is the env's own (get_reward); a failed tool call costs nothing extra

    def __init__(self, factory: Any, rows: Any = None, tool_timeout_s: float = 10.0, render_mode: str | None = None):
        super().__init__(render_mode=render_mode)
        self.inner = resolve_target(factory, "TRLEnv factory")()
        if not callable(getattr(self.inner, "reset", None)):
            raise ValueError(f"TRLEnv factory {factory!r} made a {type(self.inner).__name__} without reset(); a TRL "
                             f"environment defines reset(**kwargs) -> str | None, its tools as public methods.")
        self.rows = load_rows(rows, "TRLEnv rows")
        self.functions = tool_methods(self.inner)
        self.tools = [tool_spec(name, fn) for name, fn in self.functions.items()]
        self.tool_timeout_s = tool_timeout_s
        self.system_prompt = tools_prompt(self.tools)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        row = self.rows[int(self.np_random.integers(len(self.rows)))] if self.rows else {}
        extra = self.inner.reset(**row, **({"seed": seed} if _takes(self.inner.reset, "seed") else {}))
        system, prompt = split_prompt(row.get("prompt"))
        observation = "\n".join(text for text in (prompt, extra) if text)
        if not observation:
            raise ValueError(f"{type(self.inner).__name__}.reset() returned {extra!r} and no row has a 'prompt': nothing to "
                             f"show the model. Return the task's text from reset(), or give TRLEnv rows with a 'prompt'.")
        self.system_prompt = system_prompt(system, self.tools)
        return self.observe(observation)

    def final_answer(self, text: str):
        get_reward = getattr(self.inner, "get_reward", None)
        reward = float(_synchronous(get_reward)()) if callable(get_reward) else 0.0
        return self.result("done", {"get_reward": reward}, terminated=True, success=reward > 0)

    def run_tool(self, call: ToolCall):
        result = call_tool(call, self.functions, self.tool_timeout_s)
        if result.ok:
            return self.result(result.output, {}, role="tool")
        usage = f" Call it as {_usage(call.name, self.functions[call.name])}." if call.name in self.functions else ""
        return self.result(result.output + usage, {}, invalid=True, role="tool")


def tool_methods(obj: Any) -> dict[str, Callable[..., Any]]:
    """TRL's rule: the public functions of ``type(obj)`` but ``reset`` and ``get_reward``, bound to ``obj``."""
    names = [name for name, _ in inspect.getmembers(type(obj), inspect.isfunction)
             if name not in ("reset", "get_reward") and not name.startswith("_")]
    return {name: _synchronous(getattr(obj, name)) for name in names}


def tool_spec(name: str, fn: Callable[..., Any]) -> dict:
    """``{"name", "description", "parameters"}`` (JSON schema) from the signature and the docstring's first line."""
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return {"name": name, "description": (inspect.getdoc(fn) or "").split("\n")[0],
            "parameters": {"type": "object",
                           "properties": {p.name: {"type": _JSON_TYPES.get(p.annotation, "string")} for p in params},
                           "required": [p.name for p in params if p.default is p.empty]}}


def _usage(name: str, fn: Callable[..., Any]) -> str:
    return signature(tool_spec(name, fn))


def _takes(fn: Callable[..., Any], name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _synchronous(fn: Callable[..., Any]) -> Callable[..., Any]:
    if not inspect.iscoroutinefunction(fn):
        return fn

    @functools.wraps(fn)
    def run(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return run

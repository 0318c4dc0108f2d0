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
- The first answer without a tool call ends the episode, as in TRL; its reward is ``get_reward()`` plus TRL's
  reward functions when ``reward_funcs`` names them (``["my_envs.rewards:solved"]``, each called as TRL calls
  it, ``fn(environments=[env], prompts=[...], completions=[answer], **row)`` with the arguments it takes, and
  returning a list of one number; each is a reward component under its name), success a positive reward.
  As in TRL, a class with neither is refused (every episode would score 0); a reward that is None is "not
  applicable" and left out (all None scores 0, warned), and one that is not a finite number, or an exception
  in one, is the env's error (the episode is ``env_error``, with a message naming the function). Rows whose
  ``prompt`` is chat messages are TRL's conversational data: prompts and completions are then messages too.
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
import math
import warnings
from typing import Any, Callable

from hybrid_rl.envs.adapters.common import (ToolCallingEnv, load_rows, resolve_target, signature, split_prompt,
                                           system_prompt, tools_prompt)
from hybrid_rl.envs.contract import as_float
from hybrid_rl.envs.tools import ToolCall, call_tool

__all__ = ["TRLEnv", "tool_methods", "tool_spec"]

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}
_JSON_TYPES.update({t.__name__: name for t, name in list(_JSON_TYPES.items())})  # string annotations too


class TRLEnv(ToolCallingEnv):
    """A TRL environment_factory environment: public methods are tools, get_reward() is the reward."""

    invalid_penalty = 0.0  # the reward is the env's own (get_reward); a failed tool call costs nothing extra

    def __init__(self, factory: Any, rows: Any = None, tool_timeout_s: float = 10.0, render_mode: str | None = None,
                 reward_funcs: Any = None):
        super().__init__(render_mode=render_mode)
        self.inner = resolve_target(factory, "TRLEnv factory")()
        if not callable(getattr(self.inner, "reset", None)):
            raise ValueError(f"TRLEnv factory {factory!r} made a {type(self.inner).__name__} without reset(); a TRL "
                             f"environment defines reset(**kwargs) -> str | None, its tools as public methods.")
        funcs = [reward_funcs] if isinstance(reward_funcs, str) or callable(reward_funcs) else list(reward_funcs or [])
        self.reward_funcs = [resolve_target(f, "TRLEnv reward_funcs") for f in funcs]
        names = [_name(fn) for fn in self.reward_funcs] + ["get_reward"] * callable(getattr(self.inner, "get_reward", None))
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"TRLEnv reward_funcs: {', '.join(twice)} named twice (with the class's get_reward()); each "
                             "reward is logged as a component under its function's name: give the functions distinct names.")
        if not self.reward_funcs and not callable(getattr(self.inner, "get_reward", None)):
            raise ValueError(f"TRLEnv factory {factory!r}: {type(self.inner).__name__} has no get_reward() and no reward_funcs "
                             "were given, so every episode would score 0 (TRL refuses this too). Add get_reward() -> float "
                             "to the class, or pass TRL's reward functions: gymnasium.register(..., kwargs={'factory': "
                             f"{factory if isinstance(factory, str) else 'module:Class'!r}, 'reward_funcs': ['module:reward_func']}}).")
        self.row: dict = {}
        self.last_prompt = ""
        self.rows = load_rows(rows, "TRLEnv rows")
        self.functions = tool_methods(self.inner)
        self.tools = [tool_spec(name, fn) for name, fn in self.functions.items()]
        self.tool_timeout_s = tool_timeout_s
        self.system_prompt = tools_prompt(self.tools)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        row = self.rows[int(self.np_random.integers(len(self.rows)))] if self.rows else {}
        self.row = row
        extra = self.inner.reset(**row, **({"seed": seed} if _takes(self.inner.reset, "seed") else {}))
        system, prompt = split_prompt(row.get("prompt"))
        observation = "\n".join(text for text in (prompt, extra) if text)
        if not observation:
            raise ValueError(f"{type(self.inner).__name__}.reset() returned {extra!r} and no row has a 'prompt': nothing to "
                             f"show the model. Return the task's text from reset(), or give TRLEnv rows with a 'prompt'.")
        self.system_prompt = system_prompt(system, self.tools)
        self.last_prompt = observation
        return self.observe(observation)

    def final_answer(self, text: str):
        parts: dict[str, float] = {}
        name = type(self.inner).__name__
        get_reward = getattr(self.inner, "get_reward", None)
        if callable(get_reward):
            value = _reward_value(_synchronous(get_reward)(), f"{name}.get_reward()")
            if value is not None:
                parts["get_reward"] = value
        chat = isinstance(self.row.get("prompt"), list)  # TRL's conversational rows: prompts and completions as messages
        prompt = self.row["prompt"] if chat else self.last_prompt
        completion = [{"role": "assistant", "content": text}] if chat else text
        for fn in self.reward_funcs:
            try:
                values = _call_reward_func(fn, self.inner, prompt, completion, self.row)
            except Exception as err:
                raise ValueError(f"reward function {_name(fn)} raised {type(err).__name__}: {err} (it is called as TRL "
                                 f"calls it: environments=[env], prompts=[...], completions=[{'[message]' if chat else 'text'}], "
                                 "and the row's columns)") from err
            value = _reward_value(_one(values, fn), f"reward function {_name(fn)}")
            if value is not None:
                parts[_name(fn)] = value
        if not parts:  # as TRL: a rollout no reward applies to scores 0, warned
            who = ", ".join(["get_reward()"] * callable(get_reward) + [_name(fn) for fn in self.reward_funcs])
            warnings.warn(f"{name}: every reward ({who}) was None for this episode; it scores 0.", RuntimeWarning, stacklevel=2)
            parts = {"none": 0.0}
        reward = sum(parts.values())
        return self.result("done", parts, terminated=True, success=reward > 0)

    def run_tool(self, call: ToolCall):
        result = call_tool(call, self.functions, self.tool_timeout_s)
        if result.ok:
            return self.result(result.output, {}, role="tool")
        usage = f" Call it as {_usage(call.name, self.functions[call.name])}." if call.name in self.functions else ""
        return self.result(result.output + usage, {}, invalid=True, role="tool")


def _reward_value(value: Any, who: str) -> float | None:
    """A reward as a finite float, read as the engine reads one (numpy and torch scalars too; a bool is a number);
    None stays None (TRL's "not applicable"); anything else is an error naming ``who``."""
    if value is None:
        return None
    number = as_float(value)
    if not math.isfinite(number):
        raise ValueError(f"{who} returned {value!r:.80}, expected a finite number (or None where it does not apply)")
    return number


def _name(fn: Callable[..., Any]) -> str:
    """A reward function's name (its component's): ``__name__``, or a partial's function's, or the object's class."""
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", None) or type(fn).__name__


def _call_reward_func(fn: Callable[..., Any], env: Any, prompt: str, answer: str, row: dict) -> Any:
    """``fn`` called as TRL's GRPOTrainer calls a reward function: keyword lists of one item each (this episode),
    with the arguments it takes (all of them when it takes ``**kwargs``)."""
    given = {"environments": [env], "prompts": [prompt], "completions": [answer],
             **{k: [v] for k, v in row.items() if k not in ("environments", "prompts", "completions")}}
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        given = {k: v for k, v in given.items() if k in params}
    return _synchronous(fn)(**given)


def _one(values: Any, fn: Callable[..., Any]) -> Any:
    """The one reward of a reward function's list (TRL's functions return one per completion of the batch)."""
    if isinstance(values, (list, tuple)):
        if len(values) != 1:
            raise ValueError(f"reward function {_name(fn)} returned {len(values)} rewards for one completion; it is "
                             "called with lists of one item (environments=[env], completions=[answer]) and returns [reward]")
        return values[0]
    return values


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

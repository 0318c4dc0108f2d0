"""``hybrid-rl envs check ID``: gymnasium's checker plus the hybrid-rl contract.

Checks, each reported by name (an env that cannot be made with the id's arguments and the keyword arguments
fails one check, ``make``, with the constructor's error, and runs no other):
  gymnasium         gymnasium.utils.env_checker.check_env on the unwrapped env (its warnings are reported)
  text_spaces       observation and action spaces are ``gymnasium.spaces.Text``; observations are str and
                    members of the observation space
  info_contract     every step's observation is a str in the observation space and its reward a finite
                    number; ``success``/``role``/``invalid_action``, when given, have the right types, and
                    ``reward_components`` (when given) sum to the reward
  determinism       the same seed and the same actions give the same episode
  bad_actions       garbage, malformed (and deeply nested) tool calls, "", 100 KB and non-ASCII text never raise
  truncation        an agent that only sends garbage is truncated at the turn limit (or the env ends
                    the episode itself); truncation never comes before the limit
  expert            the expert ends episodes by termination; its success rate on eval seeds is
                    reported, and must be >= 99% when the env is ``solvable``

Only real contract breaks fail: an exception on model text, an observation that is not a str or that
the env's own observation space rejects, nondeterminism under a seed, a key given with the wrong type.
What a plain gymnasium text env may leave out is a warning: the info keys (``success`` then defaults to
"terminated with a positive reward", ``invalid_action`` to False), flagging bad actions as invalid, a
turn limit, a non-string action handled without raising, and a garbage agent that succeeds. Without an
expert the expert check is reported as skipped ("skip expert" and why), and the env still passes.
Envs without an expert are probed with their ``random_action`` or gymnasium's random agent (samples of
the action space, seeded by the episode's seed).

On the last allowed turn gymnasium's ``TimeLimit`` sets ``truncated`` even when the environment
terminated on that very turn (always so for the one-turn Arithmetic): ``terminated`` then wins.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
import threading
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable

import gymnasium as gym
import numpy as np
from gymnasium.utils.env_checker import check_env as gym_check_env

from hybrid_rl.envs.episode import Episode, expert_policy, run_episode
from hybrid_rl.envs.registry import LEGACY_HINT, make, merge_args, resolve_id, seeds

__all__ = ["CheckReport", "check", "BAD_ACTIONS", "SUCCESS_FLOOR"]

SUCCESS_FLOOR = 0.99
BAD_ACTIONS: dict[str, object] = {
    "empty": "",
    "whitespace": "   \n\t ",
    "garbage": "qwzx #$%^ ~~",
    "malformed_tool_call": '<tool_call>{"name": "calc", "arguments": </tool_call>',
    "unclosed_tool_call": '<tool_call>{"name": "calc"',
    "unknown_tool": '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
    "deeply_nested_tool_call": "<tool_call>" + "[" * 1500 + "</tool_call>",  # deeper than the recursion limit
    "huge_number": "9" * 400,
    "negative": "-3",
    "non_ascii": "\u2603 \u00e9\u00e8 \x00\x7f",
    "100kb": "x" * 100_000,
    "100kb_digits": "7" * 100_000,
    "not_a_string": None,
}
MUST_BE_INVALID = ("empty", "whitespace", "garbage", "100kb", "100kb_digits", "not_a_string")  # or a warning
INFO_DEFAULTS = {"success": "terminated with a positive reward", "role": "'user'", "invalid_action": "False",
                 "reward_components": "{'reward': reward}"}


@dataclass
class CheckReport:
    env_id: str
    results: dict[str, str] = field(default_factory=dict)  # check -> "ok", "skip: <why>" or the failure
    warnings: list[str] = field(default_factory=list)
    expert: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(v == "ok" or v.startswith(SKIP) for v in self.results.values())

    def format(self) -> str:
        lines = [f"{self.env_id}: {'PASS' if self.passed else 'FAIL'}"]
        for name, v in self.results.items():
            if v == "ok":
                lines.append(f"  ok   {name}")
            elif v.startswith(SKIP):
                lines.append(f"  skip {name}: {v[len(SKIP):]}")
            else:
                lines.append(f"  FAIL {name}: {v}")
        if self.expert:
            e = self.expert
            lines.append(f"  expert on {e['episodes']} eval seeds: success {e['success_rate']:.1%}, "
                         f"mean return {e['mean_return']:.3f}, mean turns {e['mean_turns']:.2f}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


NO_LIMIT_TURNS = 50  # the turns an episode of an env without max_episode_steps is played for by the checks
CHECK_TIMEOUT_S = 300.0  # the most one check may take (a reset or step that never returns is a failed check)


def check(env_id: str, episodes: int = 100, timeout_s: float = CHECK_TIMEOUT_S, **kwargs) -> CheckReport:
    """Run every check on ``env_id`` (made with its id arguments, ``ID(n=100)``, and ``kwargs``; a key given in
    both with different values is a ``ValueError``); the expert plays ``episodes`` eval seeds. Each check has
    ``timeout_s`` seconds (0 = no limit): one that hangs fails, and the others still run."""
    base, kwargs = merge_args(env_id, kwargs, source="the keyword argument")
    label = resolve_id(base) + env_id[len(base):]  # the report names the id with its arguments, ID(n=100)
    env_id = resolve_id(base)
    report = CheckReport(label)
    made = _bounded(lambda: make(env_id, **kwargs).close(), timeout_s)
    if made != "ok":  # arguments the constructor refuses: one line, not the same error from every check
        report.results["make"] = made
        return report
    steps: list[tuple[str, Callable[[], None]]] = [
        ("gymnasium", lambda: _gymnasium(env_id, kwargs, report)),
        ("text_spaces", lambda: _text_spaces(env_id, kwargs)),
        ("info_contract", lambda: _info_contract(env_id, kwargs, report)),
        ("determinism", lambda: _determinism(env_id, kwargs)),
        ("bad_actions", lambda: _bad_actions(env_id, kwargs, report)),
        ("truncation", lambda: _truncation(env_id, kwargs, report)),
        ("expert", lambda: _expert(env_id, episodes, kwargs, report)),
    ]
    for name, run in steps:
        report.results[name] = _bounded(run, timeout_s)
    return report


def _bounded(run: Callable[[], None], timeout_s: float) -> str:
    """``run()`` on a thread of its own, at most ``timeout_s`` seconds: "ok", or what went wrong (a failed check is
    a report line, not a crash of the others; a hung one is left to its daemon thread)."""
    outcome = ["did not finish"]

    def work():
        try:
            run()
            outcome[0] = "ok"
        except CheckSkipped as why:
            outcome[0] = SKIP + str(why)
        except BaseException as err:  # noqa: BLE001 - an env's SystemExit is a failed check too
            outcome[0] = f"{type(err).__name__}: {err}" if str(err) else traceback.format_exc(limit=2)

    filters, show = list(warnings.filters), warnings.showwarning  # a check records gymnasium's warnings
    worker = threading.Thread(target=work, name="env check", daemon=True)
    worker.start()
    worker.join(timeout_s if timeout_s > 0 else None)
    if worker.is_alive():  # left hanging inside its warnings context: the process gets its own state back
        warnings.filters[:], warnings.showwarning = filters, show
        return (f"did not finish within {timeout_s:g} s: a reset, step or close that does not return (or an env this "
                "slow: raise --timeout)")
    return outcome[0]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # gymnasium colours its warnings


class CheckFailed(AssertionError):
    pass


class CheckSkipped(Exception):
    """A check that does not apply to this env (the report says "skip" and why, not "ok")."""


SKIP = "skip: "


@contextlib.contextmanager
def _made(env_id: str, kwargs: dict):
    """The env, closed when the check is done with it, passed or failed (an env may hold a server session, a
    subprocess or files)."""
    env = make(env_id, **kwargs)
    try:
        yield env
    except BaseException as failure:  # the check's own failure is the report, not a close() that fails after it
        try:
            env.close()
        except Exception as err:  # noqa: BLE001
            failure.add_note(f"(close() then raised {type(err).__name__}: {err})")
        raise
    env.close()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def _gymnasium(env_id: str, kwargs: dict, report: CheckReport) -> None:
    with _made(env_id, kwargs) as env:
        _require(not _old_step_api(env.unwrapped),
                 f"step returns the old gym 4-tuple (obs, reward, done, info). {LEGACY_HINT}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gym_check_env(env.unwrapped, skip_close_check=False)
        report.warnings += sorted({_ANSI.sub("", str(w.message)) for w in caught})


def _old_step_api(env: gym.Env) -> bool:
    """True when ``step`` returns old gym's 4-tuple (an env that raises here is left to the other checks)."""
    try:
        env.reset(seed=0)
        out = env.step("")
    except Exception:
        return False
    return isinstance(out, tuple) and len(out) == 4


def _text_spaces(env_id: str, kwargs: dict) -> None:
    with _made(env_id, kwargs) as env:
        for name in ("observation_space", "action_space"):
            space = getattr(env, name)
            _require(isinstance(space, gym.spaces.Text),
                     f"{name} is {space!r}; text environments use gymnasium.spaces.Text (envs.text_space).")
        obs, info = env.reset(seed=0)
        _require(isinstance(obs, str), f"reset returned a {type(obs).__name__} observation; expected str.")
        _require(obs in env.observation_space, f"reset observation {obs[:40]!r} is not in observation_space {env.observation_space!r}; "
                                               f"{_SPACE_HINT}")
        prompt, tools = getattr(env.unwrapped, "system_prompt", None), getattr(env.unwrapped, "tools", [])
        _require(prompt is None or isinstance(prompt, str), f"system_prompt must be str or None, got {type(prompt).__name__}.")
        _require(isinstance(tools, (list, tuple)) and all(isinstance(t, dict) and "name" in t for t in tools),
                 "tools must be a list of specs with a 'name' (and 'description', 'parameters').")


_SPACE_HINT = ("raise its max_length or widen its charset (gymnasium's default Text charset is letters and digits "
               "only; envs.text_space(n) allows printable ASCII).")


def _check_step(env: gym.Env, out: tuple, where: str) -> None:
    obs, reward, terminated, truncated, info = out
    _require(isinstance(obs, str), f"{where}: observation is {type(obs).__name__}, expected str.")
    _require(obs in env.observation_space, f"{where}: observation {obs[:40]!r} is not in observation_space; {_SPACE_HINT}")
    _require(isinstance(reward, numbers.Real) and math.isfinite(reward), f"{where}: reward {reward!r} is not a finite number.")
    _require(isinstance(terminated, (bool, np.bool_)) and isinstance(truncated, (bool, np.bool_)),
             f"{where}: terminated/truncated must be bool.")
    _require(isinstance(info, dict), f"{where}: info is {type(info).__name__}, expected dict.")
    _require(isinstance(info.get("success", False), (bool, np.bool_)), f"{where}: info['success'] must be a bool.")
    _require(info.get("role", "user") in ("user", "tool"), f"{where}: info['role'] is {info.get('role')!r}; expected 'user' or 'tool'.")
    _require(isinstance(info.get("invalid_action", False), (bool, np.bool_)), f"{where}: info['invalid_action'] must be a bool.")
    _require(isinstance(info.get("state", ""), str),
             f"{where}: info['state'] is {type(info.get('state')).__name__}; name the state with a str (TextEnv.state_key "
             "returns it), e.g. GuessNumber's interval '51-75'.")
    components = info.get("reward_components")
    if components is not None:
        _require(math.isclose(sum(components.values()), reward, abs_tol=1e-6),
                 f"{where}: reward_components {components} sum to {sum(components.values())}, but the reward is {reward}.")


def _probe_policy(env: gym.Env) -> Callable[[str], str]:
    """What the checks play: the expert with noise when there is one, else the env's random agent."""
    return expert_policy(env, 0.3) if hasattr(env.unwrapped, "expert_action") else expert_policy(env, policy="random")


def _info_contract(env_id: str, kwargs: dict, report: CheckReport) -> None:
    with _made(env_id, kwargs) as env:
        act = _probe_policy(env)
        limit = env.spec.max_episode_steps if env.spec else None
        seen: set[str] = set()
        for seed in seeds(env_id, "train", 5):
            obs, _ = env.reset(seed=seed)
            env.action_space.seed(seed)
            for turn in range(1, _turns(env) + 1):
                out = env.step(act(obs))
                _check_step(env, out, f"seed {seed} turn {turn}")
                obs, _, terminated, truncated, info = out
                seen.update(k for k in INFO_DEFAULTS if k in info and k != "success")
                _require(not truncated or turn == limit, f"seed {seed}: truncated at turn {turn}, before the limit {limit}.")
                if terminated or truncated:
                    seen.update({"success"} & set(info))
                    break
        missing = [f"{k} (read as {v})" for k, v in INFO_DEFAULTS.items() if k not in seen]
        if missing:
            report.warnings.append(f"info never gives {', '.join(missing)}; set them to say what the defaults cannot "
                                   f"(success at the episode's end, invalid_action for unusable model text).")


def _turns(env: gym.Env) -> int:
    """The most turns a check plays: the env's turn limit, or ``NO_LIMIT_TURNS`` without one (an episode of an env
    without a limit may never end; the truncation check warns about the missing limit)."""
    limit = env.spec.max_episode_steps if env.spec else None
    return limit if limit is not None else NO_LIMIT_TURNS


def _determinism(env_id: str, kwargs: dict) -> None:
    for seed in seeds(env_id, "train", 5):
        first, second = (_trace(env_id, seed, kwargs) for _ in range(2))
        _require(repr(first) == repr(second), f"seed {seed}: two runs with the same seed and actions differ: {_first_difference(first, second)}")


def _first_difference(first: list, second: list) -> str:
    """Where two traces (messages, rewards, terminated, truncated) part, shortly (repr: a NaN reward equals itself)."""
    for name, a, b in zip(("messages", "rewards", "terminated", "truncated"), first, second):
        if repr(a) == repr(b):
            continue
        if isinstance(a, list) and isinstance(b, list):
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if repr(x) != repr(y)), min(len(a), len(b)))
            x, y = (repr(v[i])[:120] if i < len(v) else "(none)" for v in (a, b))
            return f"{name}[{i}]: {x} against {y}"
        return f"{name}: {repr(a)[:120]} against {repr(b)[:120]}"
    return "(no difference found)"


def _trace(env_id: str, seed: int, kwargs: dict) -> list:
    with _made(env_id, kwargs) as env:
        episode = run_episode(env, _probe_policy(env), seed=seed, max_turns=_turns(env))
        return [episode.messages, episode.rewards, episode.terminated, episode.truncated]


def _bad_actions(env_id: str, kwargs: dict, report: CheckReport) -> None:
    with _made(env_id, kwargs) as env:
        unflagged, silent = [], []
        for name, action in BAD_ACTIONS.items():
            env.reset(seed=0)
            try:
                out = env.step(action)
            except Exception as err:
                message = f"step({name}) raised {type(err).__name__}: {err}"
                if isinstance(action, str):
                    raise CheckFailed(f"{message}; step must never raise on model output.") from None
                report.warnings.append(f"{message}; model output is always text, but a step that never raises is safer.")
                continue
            _check_step(env, out, f"step({name})")
            if name in MUST_BE_INVALID and out[4].get("invalid_action") is not True:
                unflagged.append(name)
            if name in MUST_BE_INVALID and not out[0].strip():
                silent.append(name)
        if unflagged:
            report.warnings.append(f"step({', '.join(unflagged)}) not flagged info['invalid_action']=True: such turns are "
                                   f"not counted as invalid actions.")
        if silent:
            report.warnings.append(f"step({', '.join(silent)}) gave an empty observation; say what was wrong.")


def _truncation(env_id: str, kwargs: dict, report: CheckReport) -> None:
    with _made(env_id, kwargs) as env:
        limit = env.spec.max_episode_steps if env.spec else None
        if limit is None:
            report.warnings.append("no max_episode_steps: an episode ends only at the rollout's token limit; register "
                                   "the env with a turn limit (gymnasium.register(..., max_episode_steps=N)).")
            return
        episode = run_episode(env, lambda _obs: "qwzx", seed=0)
        if episode.truncated:
            _require(episode.num_turns == limit, f"truncated after {episode.num_turns} turns; the limit is {limit}.")
        if episode.success:
            report.warnings.append("an agent that only says 'qwzx' succeeded: is the task verified?")


def _expert(env_id: str, episodes: int, kwargs: dict, report: CheckReport) -> None:
    with _made(env_id, kwargs) as env:
        if not hasattr(env.unwrapped, "expert_action"):
            raise CheckSkipped("no expert_action(): this env cannot produce SFT demonstrations (add a scripted solver "
                               "to have them).")
        act = expert_policy(env, 0.0)
        runs: list[Episode] = [run_episode(env, act, seed=s, max_turns=_turns(env)) for s in seeds(env_id, "eval", episodes)]
        n = max(len(runs), 1)
        report.expert = {"episodes": len(runs), "success_rate": sum(r.success for r in runs) / n,
                         "mean_return": sum(r.episode_return for r in runs) / n,
                         "mean_turns": sum(r.num_turns for r in runs) / n}
        for r in runs:
            _require(not r.success or r.terminated, f"seed {r.seed}: a successful episode was truncated instead of terminated.")
        if getattr(env.unwrapped, "solvable", True):
            rate = report.expert["success_rate"]
            failed = [r.seed for r in runs if not r.success][:5]
            _require(rate >= SUCCESS_FLOOR, f"expert success {rate:.1%} < {SUCCESS_FLOOR:.0%} on eval seeds (failing seeds: {failed}); "
                                            f"fix the expert, raise max_episode_steps, or set solvable = False for a game of chance.")

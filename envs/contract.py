"""What the rollout engine can read from an environment: the checks of ``reset`` and ``step`` results, and their
values as numbers and flags. The engine ends an episode whose env returns something else as ``env_error``, with
the message these give; ``envs.check_env_ids`` runs the same checks once before a stage starts.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

from hybrid_rl.run import EnvsFailedError

__all__ = ["EnvsFailedError", "StepRead", "failed_episodes_error", "read_step", "reward_components", "as_float",
           "one_number", "flag", "short", "text_problem", "reset_problem", "step_problem", "step_values_problem"]


def failed_episodes_error(trajectories, what: str, fix: str) -> EnvsFailedError:
    """The error for ``what`` (e.g. "every episode of steps 3-5") having ended in env failures: the envs' first
    errors (one per env), and ``fix``."""
    first: dict[str, str] = {}
    for t in trajectories:
        first.setdefault(t.env_id, f"{t.status}: {t.error}")
    causes = "; ".join(f"{env_id}: {error}" for env_id, error in first.items())
    return EnvsFailedError(f"{what} ended as env_error or timeout ({causes}). {fix} `hybrid-rl envs check ID` checks an "
                           "env; rollout.env_timeout_s bounds a reset or step.")


def reward_components(info: dict, reward: float) -> dict[str, float]:
    """The step's named reward parts from ``info["reward_components"]``; ``{"reward": r}`` when absent or not a
    non-empty dict. Raises ``ValueError`` naming a part that is not a finite number: the parts are weighted into
    the advantages (``rl.advantages``), where one NaN or infinity would make every advantage of the batch NaN."""
    parts = info.get("reward_components")
    if not isinstance(parts, dict) or not parts:
        return {"reward": reward}
    out = {}
    for k, v in parts.items():
        f = as_float(v)
        if not math.isfinite(f):
            raise ValueError(f"step returned reward component {str(k)!r} = {short(v)}, expected a finite number")
        out[str(k)] = f
    return out


def as_float(value) -> float:
    """``value`` as a float: nan when it is not a real number (numpy scalars are, and so are 0-d arrays and
    tensors holding one), inf for an int past float's range."""
    value = one_number(value)
    if not isinstance(value, numbers.Real):
        return math.nan
    try:
        return float(value)
    except OverflowError:
        return math.inf


def one_number(value):
    """A 0-d array's or tensor's item (np.array(1.0), torch.tensor(0.5)), anything else as it is."""
    if not isinstance(value, numbers.Real) and getattr(value, "shape", None) == () and hasattr(value, "item"):
        try:
            return value.item()
        except Exception:  # noqa: BLE001  (a 0-d array of something that is no number)
            return None
    return value


def flag(value, what: str) -> bool:
    """``value`` (``terminated``, ``truncated`` or an info flag) as a bool: a bool, a numpy bool, a 0-d array, a
    number (0/1) or None (False). Raises ``ValueError`` naming anything else: an array of several values
    (whose truth is ambiguous), a list, a string ("False" would read as true)."""
    if value is True or value is False:
        return value
    if value is None or isinstance(value, numbers.Number) or getattr(value, "shape", None) == ():
        try:
            return bool(value)
        except Exception:  # noqa: BLE001  (a 0-d array of something without a truth value)
            pass
    raise ValueError(f"step returned {what} = {short(value)} ({type(value).__name__}), expected a bool")


def short(value, limit: int = 80) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def text_problem(text: str, what: str) -> str:
    """What is wrong with ``text`` ("" when nothing): a lone surrogate (text decoded with
    ``errors='surrogateescape'``), which no tokenizer can encode. ``isascii`` is O(1) in CPython, so an ASCII
    observation costs nothing; other text one C-speed encode per env step."""
    if text.isascii():
        return ""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (f"{what} is not valid UTF-8 text ({err.reason}: {text[err.start:err.end]!r} at index {err.start}); "
                "decode the environment's text with errors='replace'")
    return ""


def reset_problem(outcome, env) -> str:
    """What is wrong with what ``env.reset`` returned ("" when nothing): the engine's rules, also checked before a
    run (``envs.check_env_ids``)."""
    if not isinstance(outcome, (tuple, list)) or len(outcome) != 2:  # (a 2-character string would unpack)
        return f"reset returned {type(outcome).__name__}, expected (observation, info)"
    obs, info = outcome
    if not isinstance(obs, str):
        return f"reset returned a {type(obs).__name__} observation, expected str"
    if info is not None and not isinstance(info, dict):
        return f"reset returned info of type {type(info).__name__}, expected a dict"
    system = getattr(env.unwrapped, "system_prompt", None)
    return text_problem(obs, "reset returned an observation that") or (
        text_problem(system, "the env's system_prompt") if isinstance(system, str) else "")


class StepRead(NamedTuple):
    """A step's result as the engine uses it: flags as bools, the reward a finite float, its named parts."""

    observation: str
    reward: float
    terminated: bool
    truncated: bool
    info: dict
    invalid: bool
    components: dict


def read_step(outcome) -> StepRead:
    """``env.step``'s result read as the engine reads it; ``ValueError`` saying what is wrong: not a 5-tuple, an
    observation, reward or info of another type (``step_values_problem``), a flag that is not a bool
    (``terminated``, ``truncated``, ``info["invalid_action"]``, ``info["success"]`` at the end), a reward part
    that is not a finite number. (An observation that is not valid text is checked apart: it matters only
    where the episode goes on.)"""
    if not isinstance(outcome, tuple) or len(outcome) != 5:
        what = f"a {len(outcome)}-tuple" if isinstance(outcome, tuple) else type(outcome).__name__
        raise ValueError(f"step returned {what}, expected (observation, reward, terminated, truncated, info)")
    obs, reward, terminated, truncated, info = outcome
    problem = step_values_problem(obs, reward, info)
    if problem:
        raise ValueError(problem)
    info, reward = info or {}, as_float(reward)  # finite (``step_values_problem``)
    terminated, truncated = flag(terminated, "terminated"), flag(truncated, "truncated")
    invalid = flag(info.get("invalid_action"), 'info["invalid_action"]')
    components = reward_components(info, reward)
    if (terminated or truncated) and "success" in info:
        flag(info["success"], 'info["success"]')
    return StepRead(obs, reward, terminated, truncated, info, invalid, components)


def step_problem(outcome) -> str:
    """What is wrong with what ``env.step`` returned ("" when nothing), as the engine reads it (``read_step``),
    its observation's text included: the pre-run check (``envs.check_env_ids``)."""
    try:
        step = read_step(outcome)
    except ValueError as err:
        return str(err)
    return text_problem(step.observation, "step returned an observation that")


def step_values_problem(obs, reward, info) -> str:
    """What is wrong with a step's observation, reward or info ("" when nothing): a reward that is not a finite
    number would make every advantage of its batch NaN (the group and batch statistics), so it ends its episode
    as an env error instead."""
    number = one_number(reward)  # numpy scalars, 0-d arrays and tensors too
    if not isinstance(obs, str) or not isinstance(number, numbers.Real):
        return (f"step returned observation {type(obs).__name__} and reward {type(reward).__name__}, expected str and "
                "a number")
    if not math.isfinite(as_float(number)):
        return f"step returned reward {short(reward)}, expected a finite number"
    if info is not None and not isinstance(info, dict):
        return f"step returned info of type {type(info).__name__}, expected a dict"
    return ""

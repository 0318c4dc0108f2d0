"""The registry is gymnasium's own: built-ins and plug-ins are ``gymnasium.register``-ed ids.

- Built-ins live in the ``hybrid_rl/`` namespace (``BUILTINS`` below, registered on ``from hybrid_rl import envs``).
- Third-party packages declare an entry point in the group ``hybrid_rl.envs``; its object is loaded
  on ``from hybrid_rl import envs`` and, if callable, called: it registers its ids with ``gymnasium.register``.
  Installing such a package is all it takes for its environments to appear.
- ``make`` is ``gymnasium.make`` with two conveniences: a bare name (``GuessNumber-v0``) means the
  ``hybrid_rl/`` one when that exists, and an unknown id fails with gymnasium's did-you-mean plus
  the list of hybrid_rl environments.
- ``max_episode_steps`` is the turn limit (gymnasium's ``TimeLimit`` truncates the episode).
- An env id may carry constructor arguments in parentheses: ``hybrid_rl/GuessNumber-v0(n=100)``, several
  separated by ``;`` (``(n=100;turn_penalty=0.01)``; values read as YAML scalars; no ``,`` so that the id
  stays one item of a YAML list). Such an id names one setting of an environment everywhere a plain id
  goes (configs, seeds, metric names): ``envs=[hybrid_rl/GuessNumber-v0(n=100)]`` trains, evaluates and
  logs that setting with no other key. Constructors check their arguments with ``int_arg``/``number_arg``/
  ``bool_arg`` (a ``ValueError`` naming the key, what it takes, and the YAML slip behind it: ``1e9`` is text,
  ``n=100,turn_penalty=1`` one text value); ``check_env_ids`` makes each env of a run once, before any work.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import load_env_creator

from hybrid_rl.registry import check_name

__all__ = ["NAMESPACE", "ENTRY_POINT_GROUP", "BUILTINS", "UnknownEnvironmentError", "register_builtins",
           "load_plugins", "import_env_modules", "check_env_ids", "make", "resolve_id", "env_ids", "describe",
           "max_turns", "seeds", "EVAL_SEED_START", "split_args", "merge_args", "int_arg", "number_arg", "bool_arg"]

NAMESPACE = "hybrid_rl"
ENTRY_POINT_GROUP = "hybrid_rl.envs"
EVAL_SEED_START = 1_000_000_000  # train seeds are 0, 1, ...; eval seeds start here, so they never meet
VAL_SEED_START = 500_000_000  # validation seeds (for choosing a recipe without looking at the held-out eval seeds)
SPLIT_START = {"train": 0, "val": VAL_SEED_START, "eval": EVAL_SEED_START}


@dataclass(frozen=True)
class Builtin:
    name: str  # without the namespace
    entry_point: str
    max_turns: int
    kwargs: dict = field(default_factory=dict)


# Turn limits leave the expert room (GuessNumber: binary search over 16 needs 5 guesses).
BUILTINS: tuple[Builtin, ...] = (
    Builtin("GuessNumber-v0", "hybrid_rl.envs.guess_number:GuessNumber", 8),
    Builtin("FrozenLake-v1", "hybrid_rl.envs.toy_text:FrozenLake", 20),
    Builtin("Taxi-v3", "hybrid_rl.envs.toy_text:Taxi", 40),
    Builtin("CliffWalking-v1", "hybrid_rl.envs.toy_text:CliffWalking", 40),
    Builtin("Blackjack-v1", "hybrid_rl.envs.toy_text:Blackjack", 10),
    Builtin("Calculator-v0", "hybrid_rl.envs.calculator:Calculator", 8),
    Builtin("Arithmetic-v0", "hybrid_rl.envs.calculator:Arithmetic", 1),
    Builtin("Mastermind-v0", "hybrid_rl.envs.mastermind:Mastermind", 10),
    Builtin("Buttons-v0", "hybrid_rl.envs.buttons:Buttons", 16),
    Builtin("Nim-v0", "hybrid_rl.envs.nim:Nim", 12),  # 23 stones, 1 each: 12 of your moves
    Builtin("Snake-v0", "hybrid_rl.envs.snake:Snake", 30),
    Builtin("PythonTool-v0", "hybrid_rl.envs.python_tool:PythonTool", 6),
    Builtin("MathWords-v0", "hybrid_rl.envs.math_words:MathWords", 1),  # multi-turn: (max_attempts=3;max_episode_steps=3)
    Builtin("Dataset-v0", "hybrid_rl.envs.dataset:DatasetEnv", 1),  # (path=file.jsonl;...): docs/ENVIRONMENTS.md
)

_plugin_ids: dict[str, list[str]] = {}  # entry-point name -> ids it registered


class UnknownEnvironmentError(gym.error.UnregisteredEnv):
    """An id that is not registered; the message has gymnasium's suggestion and our list."""


def register_builtins() -> None:
    for b in BUILTINS:
        env_id = f"{NAMESPACE}/{b.name}"
        if env_id not in gym.registry:  # importing twice (or reloading) must not warn
            gym.register(id=env_id, entry_point=b.entry_point, max_episode_steps=b.max_turns, kwargs=dict(b.kwargs))


def load_plugins() -> dict[str, list[str]]:
    """Load every ``hybrid_rl.envs`` entry point once; a broken plug-in warns and is skipped."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _plugin_ids:
            continue
        before, obj = set(gym.registry), None
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except Exception as err:
            takes_args = callable(obj) and isinstance(err, TypeError) and _required_args(obj)
            shape = (" The entry point is called with no arguments: point it at a module that registers its envs on "
                     "import, or at a function `register()` (no parameters) that calls gymnasium.register."
                     if takes_args else "")
            warnings.warn(f"the {ENTRY_POINT_GROUP} entry point {ep.name!r} ({ep.value}) failed to load: "
                          f"{type(err).__name__}: {err}.{shape} Its environments are not available; fix or uninstall "
                          f"the package that declares it.", RuntimeWarning, stacklevel=2)
            _plugin_ids[ep.name] = []
            continue
        _plugin_ids[ep.name] = sorted(set(gym.registry) - before)
    return dict(_plugin_ids)


def _required_args(fn) -> bool:
    """Whether calling ``fn()`` lacks a required argument."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               for p in params)


def import_env_modules(modules) -> None:
    """Import the modules that register third-party environments (``pool.env_modules``), in this process: the
    driver checks ids and draws seeds, and an in-process pool plays, as the Ray workers do after their own import."""
    for module in modules or ():
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UnknownEnvironmentError(f"pool.env_modules: cannot import {module!r} ({err}); give the module that "
                                          "registers your environments (install its package, or fix the name).") from None
        except Exception as err:  # the module was found but failed while running its top-level code
            raise UnknownEnvironmentError(f"pool.env_modules: importing {module!r} raised {type(err).__name__}: {err}; "
                                          "fix that module (its top-level code runs on import) or leave it out.") from err


def check_env_ids(env_ids, env_modules=(), timeout_s: float = 30.0) -> None:
    """A stage's env ids, before any work: unknown ids, a ``module:id`` whose module fails to import and malformed
    id arguments are a ``ConfigError`` with gymnasium's did-you-mean; ids that ``pool.env_modules`` registers are
    known once those modules are imported. Each env is then made, reset once (on its first train seed), stepped
    once with an arbitrary action (the first actions of a policy are arbitrary text) and closed, within
    ``timeout_s`` (the stage's ``env_timeout_s``; 0 = no limit), so that arguments its constructor refuses
    (``GuessNumber-v0(nn=3)``), a reset or step that fails or returns what the engine cannot read (a 4-tuple
    step, an observation that is not text) and one that hangs fail here, not as an ``env_error`` in every episode
    of a run that then trains on nothing."""
    from hybrid_rl.config import ConfigError

    try:
        import_env_modules(env_modules)
    except UnknownEnvironmentError as err:
        raise ConfigError(str(err)) from None
    for env_id in env_ids:
        try:
            resolve_id(env_id)
        except (UnknownEnvironmentError, ValueError) as err:
            raise ConfigError(f"envs: {err}") from None
        problem = _first_contact(env_id, timeout_s)
        if problem:
            raise ConfigError(f"envs: {env_id!r} {problem}") from None


PROBE_ACTION = "?"  # the action of the pre-run step: arbitrary text, as a policy's first actions are
MAKE_CLOSE_TIMEOUT_S = 300.0  # the pre-run check's limit on an env's constructor and close (untimed in a run)


def _first_contact(env_id: str, timeout_s: float) -> str:
    """Make, reset, step and close ``env_id`` on a thread of its own: what went wrong, as the rest of a
    ``check_env_ids`` error ("" when nothing). The reset and the step each have ``timeout_s`` seconds, as in a run
    (0 = no limit); the constructor and close ``MAKE_CLOSE_TIMEOUT_S`` (a run does not time them, but one that
    never returns would hang it). gymnasium's warnings are silenced here, in the caller's thread (they come
    again where the env is played), so that a thread left hanging holds no process-wide state."""
    import threading
    import time

    state = {"phase": "make", "since": time.monotonic(), "problem": ""}
    check = f"`hybrid-rl envs check '{env_id}'` checks the env against the API it must follow"

    def contact():
        try:
            state["problem"] = _contact(env_id, state, check)
        except BaseException as err:  # noqa: BLE001 - reported in the caller's thread
            state["problem"] = f"failed: {type(err).__name__}: {err}"

    worker = threading.Thread(target=contact, name=f"check {env_id}", daemon=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        worker.start()
        while worker.is_alive():
            phase = state["phase"]
            limit = timeout_s if phase in ("reset", "step") else MAKE_CLOSE_TIMEOUT_S
            left = state["since"] + limit - time.monotonic() if limit > 0 else 1.0
            if left <= 0 and state["phase"] == phase:  # (left to itself: a daemon thread does not keep the process)
                if phase in ("reset", "step"):
                    return (f"did not return from env.{phase} within {timeout_s:g} s (the stage's env_timeout_s): every "
                            f"episode would end as timeout. {check}; raise env_timeout_s if the env is slow but works.")
                return (f"did not return from env.{'__init__' if phase == 'make' else phase} within {limit:g} s: a run "
                        f"would hang on it. {check}.")
            worker.join(min(max(left, 0.01), 0.5))
    return state["problem"]


def _contact(env_id: str, state: dict, check: str) -> str:
    """``_first_contact``'s work, on its thread; ``state["phase"]`` / ``["since"]`` say where it is."""
    import time

    from hybrid_rl.envs.contract import reset_problem, step_problem

    def enter(phase: str) -> None:
        state["phase"], state["since"] = phase, time.monotonic()

    try:
        env = make(env_id)
    except NotAnEnvError as err:  # its class: an adapter is the fix, not the arguments
        return f"is not a gymnasium env: {err}"
    except Exception as err:  # any failure of the constructor would end every episode of this env
        registered = "the env's constructor or the kwargs it is registered with (gymnasium.register(..., kwargs=...))"
        fix = (f"Fix the id's arguments (written ID(key=value;key2=value2)) or {registered}" if "(" in env_id else
               f"Fix {registered}")
        return f"cannot be made: {type(err).__name__}: {err}\n{fix}; `hybrid-rl envs check '{env_id}'` tries it."
    try:
        enter("reset")
        try:
            outcome = env.reset(seed=seeds(env_id, "train", 1)[0])
        except Exception as err:
            return (f"fails its first reset (train seed 0): {type(err).__name__}: {err}\nEvery episode of it would end "
                    f"as env_error. {check} (reset(seed=..., options=...) -> (observation, info)).")
        problem = reset_problem(outcome, env)
        if problem and isinstance(outcome, str):
            problem += f" (old gym's reset returns the observation alone). {LEGACY_HINT}"
        if problem:
            return f"fails its first reset (train seed 0): {problem}\nEvery episode of it would end as env_error. {check}."
        enter("step")
        try:
            outcome = env.step(PROBE_ACTION)
        except Exception as err:
            if "expected 5, got 4" in str(err):  # gymnasium's wrappers unpack the step first
                return (f"fails its first step (action {PROBE_ACTION!r}): step returned a 4-tuple (old gym's (observation, "
                        f"reward, done, info)), expected (observation, reward, terminated, truncated, info). {LEGACY_HINT}")
            return (f"fails its first step (action {PROBE_ACTION!r}): {type(err).__name__}: {err}\nA policy's first "
                    f"actions are arbitrary text, so most episodes would end as env_error; an action the env cannot "
                    f"use is an invalid action (info['invalid_action'] = True), not an exception. {check}.")
        problem = step_problem(outcome)
        if problem:
            legacy = f" {LEGACY_HINT}" if isinstance(outcome, tuple) and len(outcome) == 4 else ""
            return (f"fails its first step (action {PROBE_ACTION!r}): {problem}\nEvery episode of it would end as "
                    f"env_error. {check}.{legacy}")
    finally:
        enter("close")
        try:
            env.close()
        except Exception as err:  # the engine closes envs apart from the episodes: warned, not fatal
            import logging

            logging.getLogger("hybrid_rl.envs").warning("%s: env.close() failed: %s: %s", env_id, type(err).__name__, err)
    return ""


def env_ids() -> list[str]:
    """Every hybrid_rl environment: the ``hybrid_rl/`` namespace plus whatever plug-ins registered."""
    ids = {i for i in gym.registry if i.startswith(NAMESPACE + "/")}
    for registered in _plugin_ids.values():
        ids.update(registered)
    return sorted(ids)


def split_args(env_id: str) -> tuple[str, dict]:
    """``"GuessNumber-v0(n=100;turn_penalty=0.01)"`` -> ``("GuessNumber-v0", {"n": 100, "turn_penalty": 0.01})``."""
    import yaml

    if "(" not in env_id:
        return env_id, {}
    base, _, args = env_id.partition("(")
    hint = "write arguments as ID(key=value;key2=value2), e.g. hybrid_rl/GuessNumber-v0(n=100)"
    if not args.endswith(")"):
        comma = " (a ',' in an id inside a YAML list splits it in two: separate arguments with ';')" if "," in env_id else ""
        raise ValueError(f"env id {env_id!r}: no closing ')'{comma}; {hint}")
    kwargs = {}
    for part in filter(None, args[:-1].split(";")):
        key, eq, value = part.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ValueError(f"env id {env_id!r}: {part!r} is not key=value; {hint}")
        if key.strip() in kwargs:
            raise ValueError(f"env id {env_id!r}: {key.strip()} is given twice; give each argument once.")
        kwargs[key.strip()] = yaml.safe_load(value)
    return base, kwargs


def merge_args(env_id: str, kwargs: dict | None = None, source: str = "--arg") -> tuple[str, dict]:
    """``("GuessNumber-v0(n=100)", {"turn_penalty": 0})`` -> ``("GuessNumber-v0", {"n": 100, "turn_penalty": 0})``:
    the id's arguments with ``kwargs`` added; a key given in both with different values is a ``ValueError``
    naming both (``source`` says where ``kwargs`` came from)."""
    base, merged = split_args(env_id)
    for key, value in (kwargs or {}).items():
        if key in merged and merged[key] != value:
            raise ValueError(f"{key} is given twice, {key}={merged[key]!r} in the env id {env_id!r} and {source} "
                             f"{key}={value!r}; give it once (in the id or as {source}).")
        merged[key] = value
    return base, merged


def _expected(owner: str, key: str, value, what: str) -> ValueError:
    """The error for a kwarg of the wrong type, with a hint for the slips that id arguments (YAML scalars) invite."""
    hint = ""
    if isinstance(value, str) and "," in value:
        hint = (f" Arguments in an env id are separated by ';', not ',': write ({key}={value.replace(',', ';')}).")
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and math.isfinite(number):
            written = str(int(number)) if "integer" in what and number.is_integer() else repr(number)
            hint = f" Id arguments are read as YAML, which reads {value!r} as text: write {key}={written}."
    elif isinstance(value, float) and "integer" in what and value.is_integer():
        hint = f" Write {key}={int(value)}."
    elif value is None:
        hint = f" An empty value is read as null: give {key} a value, or leave it out for the default."
    return ValueError(f"{owner} {key}={value!r}: expected {what}.{hint}")


def int_arg(owner: str, key: str, value, minimum: int | None = None, note: str = "") -> int:
    """``value`` as an int (not a bool), at least ``minimum``; else a ``ValueError`` naming ``owner``'s ``key``
    (``note``, e.g. "(the map's side)", follows the expected range in the message)."""
    what = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (f" {note}" if note else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _expected(owner, key, value, what)
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner} {key}={value!r}: expected {what}.")
    return int(value)


def number_arg(owner: str, key: str, value, low: float | None = None, high: float | None = None,
               low_open: bool = False, note: str = "") -> float:
    """``value`` as a float (an int or float, not a bool) in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if low is not None and high is not None:
        what = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
    elif low is not None:
        what = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        what = "a number"
    what += f" {note}" if note else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise _expected(owner, key, value, what)
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        raise ValueError(f"{owner} {key}={value!r}: expected {what}.")
    return float(value)


def bool_arg(owner: str, key: str, value) -> bool:
    """``value`` if it is a bool (in an env id: ``true``/``false``); else a ``ValueError`` naming ``owner``'s ``key``."""
    if not isinstance(value, (bool, np.bool_)):
        raise _expected(owner, key, value, f"true or false (write {key}=true or {key}=false)")
    return bool(value)


def resolve_id(env_id: str) -> str:
    """``GuessNumber-v0`` -> ``hybrid_rl/GuessNumber-v0``; raises ``UnknownEnvironmentError`` if unknown.

    Like ``gymnasium.make``, ``module:id`` imports ``module`` first (for an env registered there).
    Arguments in parentheses are not part of the registered id (``make`` passes them on).
    """
    full_id = env_id
    env_id, _ = split_args(env_id)
    if ":" in env_id:
        module, _, env_id = env_id.partition(":")
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UnknownEnvironmentError(f"env id {full_id!r}: cannot import the module {module!r} ({err}); install "
                                          f"the package that provides it, put its folder on PYTHONPATH (a module in the "
                                          f"current folder: PYTHONPATH=. hybrid-rl ...), or fix the name before the ':'.") from None
        except Exception as err:  # found, but its top-level code failed
            raise UnknownEnvironmentError(f"env id {full_id!r}: importing the module {module!r} raised "
                                          f"{type(err).__name__}: {err}; fix that module (its top-level code runs "
                                          f"on import).") from err
    if "/" not in env_id and f"{NAMESPACE}/{env_id}" in gym.registry:
        return f"{NAMESPACE}/{env_id}"
    if env_id in gym.registry:
        return env_id
    lookup = env_id if "/" in env_id else f"{NAMESPACE}/{env_id}"
    try:  # gymnasium raises its own error with a did-you-mean; we add the list of ours
        gym.spec(lookup)
    except gym.error.Error as err:
        raise UnknownEnvironmentError(_unknown_message(str(err))) from None
    return lookup


def _unknown_message(gym_message: str) -> str:
    listing = "\n".join(f"  {i}" for i in env_ids()) or "  (none registered)"
    return (f"{gym_message}\nhybrid_rl environments:\n{listing}\n"
            f"Run `hybrid-rl envs list` for descriptions; a plug-in's environments appear once its package is installed. "
            f"An env registered by a module of your own: write the id as 'module:id', or name the module in "
            f"pool.env_modules.")


LEGACY_HINT = ("An env written for old gym (reset -> obs, step -> (obs, reward, done, info)) plays through an adapter: "
               "gymnasium.register(ID, entry_point='hybrid_rl.envs.adapters:LegacyStepAPI', kwargs={'env': 'module:Class'}).")


TRL_HINT = ("A TRL environment_factory class (reset(**kwargs) -> str | None, its tools as public methods, get_reward()) "
            "plays through an adapter: gymnasium.register(ID, entry_point='hybrid_rl.envs.adapters:TRLEnv', "
            "kwargs={'factory': 'module:Class'}).")


class NotAnEnvError(TypeError):
    """An id whose entry point makes something other than a gymnasium env (the error says which adapter fits)."""


def _entry_class(env_id: str) -> type | None:
    """The class ``env_id``'s entry point names, or None (a factory function, or an id that does not load)."""
    try:
        entry = gym.spec(env_id).entry_point
        creator = entry if callable(entry) else load_env_creator(entry)
    except Exception:  # noqa: BLE001 - only for a hint
        return None
    return creator if isinstance(creator, type) else None


def _adapter_hint(env_id: str) -> str:
    """Which adapter plays what ``env_id``'s entry point makes, from the methods of its class."""
    creator = _entry_class(env_id)
    if creator is None:
        return LEGACY_HINT
    has = lambda name: callable(getattr(creator, name, None))  # noqa: E731
    if has("init") and has("step"):
        return ("A SkyRL-Gym BaseTextEnv (init(prompt), step(action) -> {observations, reward, done, metadata}) plays "
                "through an adapter: gymnasium.register(ID, entry_point='hybrid_rl.envs.adapters:SkyRLEnv', "
                "kwargs={'env': 'module:Class', 'rows': 'rows.jsonl'}).")
    if has("step"):
        return LEGACY_HINT
    if has("reset"):
        return TRL_HINT
    if has("env_response") or has("rollout") or has("is_completed"):
        return ("A verifiers environment is not played as it is: hybrid-rl plays gymnasium text envs (step(text) -> "
                "(observation, reward, terminated, truncated, info)); write its rules as a TextEnv (docs/ENVIRONMENTS.md, "
                "\"Write your own\"), or serve it over NeMo-Gym's HTTP API for NemoGymEnv.")
    return f"{creator.__name__} has neither reset() nor step(). {LEGACY_HINT} {TRL_HINT}"


def make(env_id: str, **kwargs) -> gym.Env:
    """``gymnasium.make`` for text environments (``max_episode_steps=`` changes the turn limit); arguments
    in the id (``ID(n=100)``) come first, ``kwargs`` override them."""
    name, id_kwargs = split_args(env_id)
    resolved = resolve_id(env_id)
    try:
        env = gym.make(resolved, **{**id_kwargs, **kwargs})
    except Exception as err:
        creator = _entry_class(resolved)
        if (isinstance(err, TypeError) and "gymnasium.Env" in str(err)) or (
                creator is not None and not issubclass(creator, gym.Env)):  # (its constructor may fail first)
            raise NotAnEnvError(f"{name}: {getattr(creator, '__name__', 'its entry point')} is not a gymnasium.Env "
                                f"({type(err).__name__}: {err}).\n{_adapter_hint(resolved)}") from None
        if not isinstance(err, TypeError):
            raise
        if "keyword argument" not in str(err):
            raise
        accepted = _accepted_kwargs(resolved)
        takes = f"it takes {accepted}, and max_episode_steps (the turn limit)" if accepted else "check the spelling"
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        given = {**id_kwargs, **kwargs}
        if unexpected and unexpected.group(1) in given:
            key = unexpected.group(1)
            raise TypeError(f"{name} has no argument {key!r} (given {key}={given[key]!r}); {takes}.") from None
        raise TypeError(f"{name}: {err}; {takes}.") from None
    attempts = getattr(env.unwrapped, "max_attempts", None)
    limit = env.spec.max_episode_steps if env.spec is not None else None
    if isinstance(attempts, int) and limit is not None and attempts > limit:  # the turn limit would cut the retries
        env.close()
        raise ValueError(f"{name}: max_attempts={attempts} but the turn limit max_episode_steps={limit} ends the episode "
                         f"first; raise it too, e.g. {name}(max_attempts={attempts};max_episode_steps={attempts}).")
    return env


def _accepted_kwargs(env_id: str) -> str:
    """The keyword arguments the env's entry point takes, for an error message ("" when unknown)."""
    try:
        spec = gym.spec(env_id)
        creator = load_env_creator(spec.entry_point) if isinstance(spec.entry_point, str) else spec.entry_point
        params = inspect.signature(creator).parameters.values()
    except Exception:
        return ""
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    return ", ".join(names)


def describe(env_id: str) -> str:
    """One line: the first line of the environment class's docstring."""
    spec = gym.spec(resolve_id(env_id))
    try:
        creator = load_env_creator(spec.entry_point) if isinstance(spec.entry_point, str) else spec.entry_point
    except Exception as err:  # a plug-in whose module fails to import still gets listed
        return f"(cannot load {spec.entry_point}: {type(err).__name__})"
    doc = (creator.__doc__ or "").strip()
    return doc.splitlines()[0].replace("``", "") if doc else "(no description: give the class a docstring)"


def max_turns(env_id: str) -> int | None:
    return gym.spec(resolve_id(env_id)).max_episode_steps


def seeds(env_id: str, split: str, n: int) -> list[int]:
    """``n`` seeds of ``split`` ("train", "val" or "eval"); no two splits share a seed.

    Train seeds count up from 0, validation seeds from ``VAL_SEED_START``, eval seeds from
    ``EVAL_SEED_START``. Tune recipes on "val"; report on "eval". The same seed gives the same episode
    on every machine (every environment draws only from its seeded ``np_random``).
    """
    resolve_id(env_id)  # an unknown id fails here, with suggestions, rather than in a worker later
    check_name("seed split", split, SPLIT_START)
    if not 0 <= n <= VAL_SEED_START:
        raise ValueError(f"n={n}: expected between 0 and {VAL_SEED_START} seeds.")
    start = SPLIT_START[split]
    return list(range(start, start + n))

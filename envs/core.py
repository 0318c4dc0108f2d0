"""The text-environment API: a ``gymnasium.Env`` whose observations and actions are strings.

``TextEnv`` is an optional base class. It adds nothing gymnasium does not already have, only the
habits every hybrid-rl environment shares, so that a new environment is a short ``reset`` and a
``step_text``:

- text observation and action spaces (``text_space``);
- ``step(action)`` cleans the model's output (non-strings, overlong text) before ``step_text`` sees it,
  so ``step`` never raises on model output;
- ``result(...)`` / ``invalid(...)`` build the step tuple with the ``info`` keys the rollout reads:
  ``success``, ``role`` ("user" or "tool"), ``invalid_action`` and ``reward_components``
  (the reward is their sum, so the two can never disagree), and ``observe`` / ``result`` add ``state``
  when the env names its state (``state_key``: for anchor-state credit where the observation is not the
  state);
- ``episode_success``: how the rollout reads ``success`` from any gymnasium env, with the default that lets an
  env without hybrid-rl's info keys train unchanged (a missing ``invalid_action`` reads as False);
- ``expert_rng`` for a scripted expert whose noise is reproducible under the reset seed;
- ``heuristic_action`` (optional): a second teacher, a rule of thumb deliberately worse than the expert,
  and ``random_action``: a random legal-looking action, the floor.

Observations are kept short and regular on purpose: the smallest models (~1M parameters, byte-level
tokens) must learn these tasks from a few minutes of SFT on a CPU.
"""

from __future__ import annotations

import re
import string
from typing import Any

import gymnasium as gym
import numpy as np

__all__ = [
    "TextEnv", "text_space", "CHARSET", "MAX_OBS_CHARS", "MAX_ACTION_CHARS",
    "first_int", "first_word", "quote", "episode_success",
]

# Printable ASCII plus whitespace: what our observations are made of. Model output outside it is
# still accepted by ``step`` (it just is not a member of ``action_space``).
CHARSET = string.printable
MAX_OBS_CHARS = 4096    # a long tool result or a rules text still fits; anything near this is a bug
MAX_ACTION_CHARS = 2048  # room for a tool call with JSON; longer output is rejected, not parsed


def episode_success(info: dict | None, reward: float, terminated: bool) -> bool:
    """Did the episode that ended with this step succeed? ``info["success"]`` when the env says so; else
    "terminated with a positive reward" (the last step's), so a plain gymnasium env trains unchanged."""
    info = info or {}
    if "success" in info:
        return bool(info["success"])
    return bool(terminated) and reward > 0


def text_space(max_length: int) -> gym.spaces.Text:
    """A ``gymnasium.spaces.Text`` over printable ASCII (gymnasium's default charset has no spaces)."""
    return gym.spaces.Text(max_length=max_length, min_length=0, charset=CHARSET)


class TextEnv(gym.Env):
    """Base class for text environments: implement ``reset`` and ``step_text``, optionally ``expert_action``
    and ``heuristic_action``.

    Class attributes a subclass may set:
      system_prompt: text for the system turn, or None.
      tools:         tool specs (``{"name", "description", "parameters"}``) the model may call.
      solvable:      True when a perfect expert always succeeds (the checker then demands >= 99%);
                     False for games of chance such as Blackjack (the success rate is only reported).
      instant_steps: True when reset and step are pure computations that return at once (no process,
                     server, file or clock): the rollout engine then calls them on its own thread instead
                     of a worker thread (faster for such envs; no timeout can stop them). False (the
                     default) for anything that can wait or block.
    """

    metadata: dict[str, Any] = {"render_modes": ["ansi"], "render_fps": 4}
    system_prompt: str | None = None
    tools: list[dict] = []
    solvable: bool = True
    invalid_penalty: float = 0.05  # what an unparseable action costs; small, so exploring stays cheap
    ends_on_invalid: bool = False  # True for one-turn tasks: any answer, parseable or not, ends the episode
    instant_steps: bool = False  # reset/step are pure and return at once: the engine may call them inline

    def __init__(self, render_mode: str | None = None, expert_noise: float = 0.0):
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode={render_mode!r} is not supported; text environments render 'ansi' (or None).")
        if not 0.0 <= expert_noise <= 1.0:
            raise ValueError(f"expert_noise={expert_noise} must be a probability in [0, 1].")
        self.render_mode = render_mode
        self.expert_noise = expert_noise  # default noise of expert_action(): a weaker teacher
        self.observation_space = text_space(MAX_OBS_CHARS)
        self.action_space = text_space(MAX_ACTION_CHARS)
        self.last_observation = ""
        self.expert_rng = np.random.default_rng(0)

    # ------------------------------------------------------------------ the gymnasium API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Subclasses call ``super().reset(seed=seed)`` first, then build their episode."""
        super().reset(seed=seed)
        # The expert draws from its own generator so that asking for an expert action never
        # changes the environment's dynamics; it is derived from the seed, so noise is reproducible.
        self.expert_rng = np.random.default_rng(int(self.np_random.integers(2**63)))
        return "", {"role": "user"}

    def step(self, action: Any):
        """Clean the model's output, then hand it to ``step_text``. Never raises on model output."""
        if not isinstance(action, str):
            return self.invalid(f"the action must be text, got {type(action).__name__}.")
        if len(action) > MAX_ACTION_CHARS:
            return self.invalid(f"the action is {len(action)} characters long; keep it under {MAX_ACTION_CHARS}.")
        return self.step_text(action)

    def step_text(self, text: str):
        raise NotImplementedError(f"{type(self).__name__} must implement step_text(text) -> (obs, reward, terminated, truncated, info)")

    def render(self) -> str | None:
        return self.last_observation if self.render_mode == "ansi" else None

    # ------------------------------------------------------------------ helpers for subclasses

    def state_key(self) -> str | None:
        """The state the next action is taken from, as a string, or None (the default) when the observation
        says it. Reported as ``info["state"]`` by ``observe`` and ``result``; RL's anchor-state credit
        (``algo.credit: state``) compares the turns of one group's episodes taken from equal keys, so two
        states that lead to the same futures (given the seed) must get equal keys and different ones
        different keys. Override it where the observation is not the state: GuessNumber's "higher" is said
        from every interval, its state is the interval the feedback leaves."""
        return None

    def _with_state(self, info: dict) -> dict:
        key = self.state_key()
        if key is not None:
            info["state"] = str(key)
        return info

    def observe(self, observation: str, role: str = "user") -> tuple[str, dict]:
        """The reset return value: ``(observation, info)``."""
        self.last_observation = observation
        return observation, self._with_state({"role": role})

    def result(self, observation: str, components: dict[str, float], *, terminated: bool = False,
               success: bool = False, invalid: bool = False, role: str = "user"):
        """The step tuple; the reward is the sum of ``components`` (also reported in info)."""
        self.last_observation = observation
        reward = float(sum(components.values()))
        info = {"success": bool(success), "role": role, "invalid_action": bool(invalid),
                "reward_components": {k: float(v) for k, v in components.items()}}
        return observation, reward, bool(terminated), False, self._with_state(info)

    def invalid(self, problem: str):
        """An action that could not be used: say why, charge ``invalid_penalty``, go on (or end)."""
        return self.result(f"Invalid: {problem}", {"invalid": -self.invalid_penalty},
                           terminated=self.ends_on_invalid, invalid=True)

    def heuristic_action(self, noise: float | None = None) -> str:
        """A plausible but systematically sub-optimal policy: a teacher that RL can improve on.

        The expert (``expert_action``) is optimal, and its noise averages out under imitation, so a model
        trained on it has nothing left to gain from RL. A heuristic is a rule of thumb whose mistakes are
        consistent (deterministic given what the observations show: learnable by imitation) and leave room
        above it. ``noise`` works as for the expert: with that probability (default: the env's
        ``expert_noise``) a random action from ``expert_rng`` instead.
        Environments that have no heuristic raise ``ValueError``.
        """
        raise ValueError(
            f"{type(self).__name__} has no heuristic_action(): policy='heuristic' needs one. Implement "
            f"heuristic_action(self, noise=None) -> str on {type(self).__name__} (a plausible rule of thumb that "
            f"is worse than the expert), or use policy='expert' or 'random'.")

    def random_action(self) -> str:
        """A uniformly random legal-looking action: the floor among teachers (``policy="random"``).

        By default the expert's noise at probability 1 (``expert_action(noise=1.0)``); an environment whose
        expert noise is smarter than random (GuessNumber guesses inside the consistent interval) overrides it.
        """
        expert = getattr(self, "expert_action", None)
        if expert is None:
            raise ValueError(f"{type(self).__name__} has neither random_action() nor expert_action(); implement "
                             f"random_action(self) -> str (a random legal-looking action) for policy='random'.")
        return expert(noise=1.0)

    def wants_noise(self, noise: float | None) -> bool:
        """True with probability ``noise`` (or the env's ``expert_noise``): the expert should err now."""
        p = self.expert_noise if noise is None else noise
        return p > 0 and self.expert_rng.random() < p


# ---------------------------------------------------------------------- lenient action parsing

_INT_RE = re.compile(r"-?\d+")
_WORD_RE = re.compile(r"[a-z]+")
MAX_INT_DIGITS = 15  # longer digit runs are not answers; int() of 4300+ digits would even raise


def first_int(text: str) -> int | None:
    """The first integer in ``text`` ("  8", "I guess 8.", "8 or 9" -> 8); None if there is none."""
    match = _INT_RE.search(text)
    if match is None or len(match.group().lstrip("-")) > MAX_INT_DIGITS:
        return None
    return int(match.group())


def first_word(text: str, choices: dict[str, int]) -> int | None:
    """The value of the first word of ``text`` (lower-cased) found in ``choices``; None if none is."""
    for word in _WORD_RE.findall(text.lower()):
        if word in choices:
            return choices[word]
    return None


def quote(text: str, limit: int = 24) -> str:
    """A short, printable rendering of model output for an error message."""
    text = text.strip()
    clipped = text[:limit] + ("..." if len(text) > limit else "")
    return ascii(clipped)

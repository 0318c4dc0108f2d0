"""SkyRL-style text environments, unchanged: ``SkyRLEnv`` plays a ``BaseTextEnv`` of SkyRL-Gym (rLLM and BALROG
write theirs alike) over the rows of its dataset::

    gymnasium.register("my/Guess-v0", entry_point="hybrid_rl.envs.adapters:SkyRLEnv",
                       kwargs={"env": "my_envs.guess:GuessEnv", "rows": "data/guess.jsonl"}, max_episode_steps=5)

The contract it follows (SkyRL-Gym's ``BaseTextEnv``): the class is made as ``Env(env_config, extras)`` with
``extras`` the dataset row; ``init(prompt) -> (prompt, metadata)`` takes the row's chat prompt;
``step(action: str)`` returns ``{"observations": [messages], "reward": float, "done": bool, "metadata": {...}}``
(a dict or an object with those attributes); ``close()``. Here:

- ``reset``: the seed picks a row; a new env is made from it (SkyRL makes one per trajectory) and ``init``
  called with the row's ``prompt``. Its system messages become the system prompt, its user messages the first
  observation.
- ``step``: the model's turn is the action; the observations' contents, joined, are the next observation
  (role ``tool`` when every message is a tool message, else ``user``); ``done`` ends the episode
  (``terminated``); ``reward`` is the turn's reward, success a positive reward at the end unless the metadata
  says ``success``. A step that raises is the env's error (the episode is ``env_error``); one that returns
  another shape raises ``SkyRLEnvError`` saying which key is wrong.
- ``env_config`` (a dict) is passed to every env made; the turn limit is gymnasium's ``max_episode_steps``
  (register it with the env's ``max_turns``).

Departures: SkyRL keeps the chat itself and may rewrite the action (``postprocessed_action``); here the
engine keeps the token ids it sampled (so the trained tokens are the ones played) and the rewritten action is
only recorded in ``info``. ``get_metrics`` is not collected.
"""

from __future__ import annotations

import math
from typing import Any

from hybrid_rl.envs.adapters.common import load_rows, resolve_target, split_prompt
from hybrid_rl.envs.contract import as_float, flag
from hybrid_rl.envs.core import TextEnv

__all__ = ["SkyRLEnv", "SkyRLEnvError"]


class SkyRLEnvError(RuntimeError):
    """A SkyRL env returned something other than its contract says: the episode is ``env_error``."""


class SkyRLEnv(TextEnv):
    """A SkyRL-Gym ``BaseTextEnv`` class and its dataset rows."""

    def __init__(self, env: Any, rows: Any, env_config: dict | None = None, render_mode: str | None = None):
        super().__init__(render_mode=render_mode)
        self.factory = resolve_target(env, "SkyRLEnv env")
        self.name = getattr(self.factory, "__name__", str(env))
        for method in ("init", "step"):
            if isinstance(self.factory, type) and not callable(getattr(self.factory, method, None)):
                raise ValueError(f"SkyRLEnv env {env!r}: {self.name} has no {method}(); a SkyRL BaseTextEnv defines "
                                 "init(prompt) -> (prompt, metadata) and step(action) -> {observations, reward, done, metadata}.")
        self.rows = load_rows(rows, "SkyRLEnv rows")
        bad = [i for i, row in enumerate(self.rows) if not row.get("prompt")]
        if not self.rows or bad:
            raise ValueError(f"SkyRLEnv rows: {'no rows' if not self.rows else f'rows {bad[:5]} have no prompt'}; each row is "
                             "a SkyRL dataset row, {\"prompt\": [{\"role\": \"user\", \"content\": ...}], ...} (the row is the "
                             "env's extras).")
        self.env_config = dict(env_config or {})
        self.inner: Any = None
        self.row: dict = {}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._close_inner()
        self.row = self.rows[int(self.np_random.integers(len(self.rows)))]
        self.inner = self.factory(self.env_config, self.row)
        answer = self.inner.init(self.row["prompt"])
        if not isinstance(answer, tuple) or len(answer) != 2 or not isinstance(answer[0], (list, str)):
            raise SkyRLEnvError(f"{self.name}.init(prompt) returned {str(answer)[:100]}; expected (prompt messages, metadata).")
        system, prompt = split_prompt(answer[0])
        if not prompt:
            raise SkyRLEnvError(f"{self.name}.init(prompt) left no user message: nothing to show the model.")
        self.system_prompt = system or None
        return self.observe(prompt)

    def step_text(self, text: str):
        out = self.inner.step(text)
        get = out.get if isinstance(out, dict) else lambda key, default=None: getattr(out, key, default)
        observations, reward, done = get("observations", []), get("reward", 0.0), get("done", False)
        metadata = get("metadata", {}) or {}
        number = as_float(reward)  # numpy and torch scalars too, as the engine reads a reward
        if isinstance(reward, bool) or not math.isfinite(number):
            raise SkyRLEnvError(f"{self.name}.step returned reward {reward!r}; expected a finite number.")
        try:
            done = flag(done, "done")
        except ValueError as err:
            raise SkyRLEnvError(f"{self.name}.{err}") from None
        if not isinstance(observations, list) or not all(isinstance(m, dict) and isinstance(m.get("content", ""), str)
                                                         for m in observations):
            raise SkyRLEnvError(f"{self.name}.step returned observations {str(observations)[:100]}; expected a list of "
                                "messages, [{\"role\": \"user\", \"content\": str}].")
        if not isinstance(metadata, dict):
            raise SkyRLEnvError(f"{self.name}.step returned metadata of type {type(metadata).__name__}; expected a dict.")
        observation = "\n".join(m.get("content", "") for m in observations)
        role = "tool" if observations and all(m.get("role") == "tool" for m in observations) else "user"
        success = bool(metadata["success"]) if isinstance(metadata.get("success"), bool) else done and number > 0
        step = self.result(observation, {"reward": number}, terminated=done, success=success, role=role)
        rewritten = get("postprocessed_action")
        if isinstance(rewritten, str) and rewritten != text:
            step[4]["postprocessed_action"] = rewritten
        return step

    def close(self):
        self._close_inner()
        super().close()

    def _close_inner(self) -> None:
        inner, self.inner = self.inner, None
        if inner is not None and callable(getattr(inner, "close", None)):
            inner.close()

"""Old gym's step API: ``LegacyStepAPI`` plays an env whose ``step`` returns ``(obs, reward, done, info)``
and whose ``reset`` returns ``obs`` (gym before 0.26), like gymnasium's ``EnvCompatibility`` did before
gymnasium 1.0 moved it out (to shimmy, which hybrid-rl does not depend on)::

    gymnasium.register("my/Old-v0", entry_point="hybrid_rl.envs.adapters:LegacyStepAPI",
                       kwargs={"env": "my_envs.old:OldEnv"}, max_episode_steps=20)

- ``done`` is truncation when ``info["TimeLimit.truncated"]`` says so (old gym's ``TimeLimit`` did), else
  termination. A 5-tuple passes through unchanged, so the adapter is harmless on a current env.
- Seeding: ``reset(seed=...)`` when the old env's ``reset`` takes a seed, else ``env.seed(seed)`` then ``reset()``.
- Spaces: the old env's when they are gymnasium ``Text`` spaces, else ``envs.text_space`` (old gym had none).
- Every other attribute (``expert_action``, ``system_prompt``, ``tools``, ...) is the old env's, but ``seed``.
"""

from __future__ import annotations

import inspect
from typing import Any

import gymnasium as gym

from hybrid_rl.envs.adapters.common import resolve_target
from hybrid_rl.envs.core import MAX_ACTION_CHARS, MAX_OBS_CHARS, text_space

__all__ = ["LegacyStepAPI"]


class LegacyStepAPI(gym.Env):
    """An old-gym text env (4-tuple step) on gymnasium's API."""

    def __init__(self, env: Any, env_kwargs: dict | None = None):
        self.inner = resolve_target(env, "LegacyStepAPI env")(**(env_kwargs or {}))
        self.observation_space = _text_or_default(getattr(self.inner, "observation_space", None), MAX_OBS_CHARS)
        self.action_space = _text_or_default(getattr(self.inner, "action_space", None), MAX_ACTION_CHARS)

    def __getattr__(self, name: str):  # only reached for what this class lacks: the old env's attributes
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("_") or name == "seed":  # seed(): reset(seed=) is the API now
            raise AttributeError(name)
        return getattr(inner, name)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        out = self._reset_inner(seed, options)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
            return out
        return out, {}

    def _reset_inner(self, seed: int | None, options: dict | None):
        params = inspect.signature(self.inner.reset).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        if "seed" in params or takes_any:
            return self.inner.reset(seed=seed, **({"options": options} if options and ("options" in params or takes_any) else {}))
        if seed is not None and callable(getattr(self.inner, "seed", None)):
            self.inner.seed(seed)
        return self.inner.reset()

    def step(self, action):
        out = self.inner.step(action)
        if len(out) == 5:
            return out
        obs, reward, done, info = out
        info = dict(info or {})
        truncated = bool(info.pop("TimeLimit.truncated", False))
        return obs, reward, bool(done) and not truncated, truncated, info

    def close(self):
        if callable(getattr(self.inner, "close", None)):
            self.inner.close()


def _text_or_default(space: Any, max_length: int) -> gym.spaces.Text:
    return space if isinstance(space, gym.spaces.Text) else text_space(max_length)

"""FixedTurns, the multi-turn environment of the rollout benchmark: a set number of turns, an observation
of a set length, a reward per turn whose action holds the target.

It measures the engine, not a policy: episode length and observation size are arguments
(``env_kwargs={"turns": 16, "obs_len": 256}``), so a benchmark sweeps them directly; ``step_delay_s``
makes every step sleep that long, standing for an environment that runs a tool or a remote call. It lives in a
package module because Ray workers import it by name: the id ``FIXED_TURNS_ID`` (``module:env``) makes
``gymnasium.make`` import this module first, in whichever process plays the episode. The rollout tests
play it too.
"""

from __future__ import annotations

import time

import gymnasium

__all__ = ["FixedTurnsEnv", "FIXED_TURNS_ID"]

FIXED_TURNS_ID = "hybrid_rl.benchmarks.fixed_turns:hybrid_rl_bench/FixedTurns-v0"


class FixedTurnsEnv(gymnasium.Env):
    """Exactly ``turns`` turns; reward 1 per turn whose action contains ``target``; success if all did.

    The observation grows a little each turn so episodes at different turns have different lengths.
    """

    metadata = {"render_modes": []}

    def __init__(self, turns: int = 4, target: str = "a", system_prompt: str | None = "Answer briefly.",
                 obs_len: int = 24, step_delay_s: float = 0.0):
        self.turns, self.target, self.obs_len, self.step_delay_s = turns, target, obs_len, step_delay_s
        self.system_prompt = system_prompt
        self.tools: list = []
        self.observation_space = gymnasium.spaces.Text(10_000)
        self.action_space = gymnasium.spaces.Text(10_000)
        self._t, self._hits, self._seed = 0, 0, 0

    @property
    def instant_steps(self) -> bool:
        """Its steps return at once unless they sleep (``step_delay_s``): only then on the engine's worker threads."""
        return not self.step_delay_s

    def _obs(self) -> str:
        pad = "abcdefghijklmnopqrstuvwxyz"[(self._seed + self._t) % 26] * max(0, self.obs_len - 12)
        return f"turn {self._t + 1}/{self.turns} {pad}"

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t, self._hits, self._seed = 0, 0, int(seed or 0)
        return self._obs(), {"role": "user"}

    def step(self, action: str):
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        hit = self.target in action
        self._hits += hit
        self._t += 1
        done = self._t >= self.turns
        info = {"role": "tool" if self._t % 2 else "user", "invalid_action": False,
                "reward_components": {"hit": float(hit)}}
        if done:
            info["success"] = self._hits == self.turns
        return ("" if done else self._obs()), float(hit), done, False, info

    def expert_action(self) -> str:
        return self.target


if "hybrid_rl_bench/FixedTurns-v0" not in gymnasium.registry:
    gymnasium.register("hybrid_rl_bench/FixedTurns-v0", entry_point=FixedTurnsEnv, disable_env_checker=True,
                       order_enforce=False)

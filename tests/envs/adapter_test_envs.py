"""Environments written for other frameworks, unchanged, for the adapter tests: ``OldReverse`` in old gym's
API (``reset() -> obs``, ``seed(n)``, a 4-tuple ``step``); ``Vault`` in TRL's ``environment_factory`` style. Importing this module registers the ids the
tests name as ``adapter_test_envs:<id>``."""

from __future__ import annotations

import random
import string

import gymnasium as gym

WORDS = ("ab", "cat", "dog", "sun", "tree")


class OldReverse:
    """Say the word backwards (old gym API: no gymnasium base class, no spaces)."""

    def __init__(self, turns: int = 3):
        self.turns, self.rng, self.word, self.t = turns, random.Random(0), "", 0

    def seed(self, seed=None):
        self.rng = random.Random(seed)

    def reset(self):
        self.word, self.t = self.rng.choice(WORDS), 0
        return f"Reverse: {self.word}"

    def step(self, action):
        self.t += 1
        if str(action).strip() == self.word[::-1]:
            return "right", 1.0, True, {}
        return f"no, reverse {self.word}", 0.0, self.t >= self.turns, {"TimeLimit.truncated": self.t >= self.turns}


class HalfPorted(gym.Env):
    """A gymnasium.Env whose step still returns old gym's 4-tuple."""

    def __init__(self):
        self.observation_space = self.action_space = gym.spaces.Text(32, charset=string.printable)
        self.inner = OldReverse()

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.inner.seed(seed)
        return self.inner.reset().replace(":", ""), {}

    def step(self, action):
        return self.inner.step(action)


class Vault:
    """Open a vault: peek at the digits of its code, then unlock it (a TRL environment_factory environment)."""

    def reset(self, seed=None, **row):
        self.code = random.Random(seed).randint(100, 999)
        self.opened, self.row = False, row
        return "A vault with a 3-digit code."

    def peek(self, digit: int) -> str:
        """Show one digit of the code (0, 1 or 2)."""
        return str(self.code)[digit]

    def unlock(self, code: int) -> str:
        """Try a code."""
        self.opened = int(code) == self.code
        return "open" if self.opened else "wrong code"

    def get_reward(self) -> float:
        return 1.0 if self.opened else 0.0


class SkyGuess:
    """Guess a number from 1 to 9 (a SkyRL-Gym BaseTextEnv, as written for SkyRL: made from the row's extras)."""

    def __init__(self, env_config=None, extras=None):
        self.target = int(extras["reward_spec"]["ground_truth"])
        self.turns, self.max_turns = 0, (env_config or {}).get("max_turns", 4)
        self.closed = False

    def init(self, prompt):
        return prompt, {}

    def step(self, action):
        self.turns += 1
        digits = [c for c in action if c.isdigit()]
        guess = int(digits[0]) if digits else None
        if guess == self.target:
            return {"observations": [], "reward": 1.0, "done": True, "metadata": {"guesses": self.turns}}
        done = self.turns >= self.max_turns
        hint = "higher" if guess is None or guess < self.target else "lower"
        return {"observations": [] if done else [{"role": "user", "content": hint}], "reward": 0.0, "done": done,
                "metadata": {}}

    def close(self):
        self.closed = True


SKY_ROWS = [{"prompt": [{"role": "system", "content": "Answer with one digit."}, {"role": "user", "content": "Guess my number (1-9)."}],
             "reward_spec": {"ground_truth": target}} for target in (3, 7)]


def _register(env_id: str, **spec) -> None:
    if env_id not in gym.registry:
        gym.register(env_id, **spec)


_register("adapter_test_envs/OldReverse-v0", entry_point="hybrid_rl.envs.adapters:LegacyStepAPI",
          kwargs={"env": "adapter_test_envs:OldReverse"}, max_episode_steps=3)
_register("adapter_test_envs/OldReverseRaw-v0", entry_point=OldReverse, max_episode_steps=3)
_register("adapter_test_envs/HalfPorted-v0", entry_point=HalfPorted, max_episode_steps=3)
_register("adapter_test_envs/Vault-v0", entry_point="hybrid_rl.envs.adapters:TRLEnv",
          kwargs={"factory": "adapter_test_envs:Vault"}, max_episode_steps=6)
_register("adapter_test_envs/SkyGuess-v0", entry_point="hybrid_rl.envs.adapters:SkyRLEnv",
          kwargs={"env": "adapter_test_envs:SkyGuess", "rows": SKY_ROWS}, max_episode_steps=4)

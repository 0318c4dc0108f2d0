"""A plain gymnasium text environment, written without hybrid-rl: no TextEnv, none of its info keys, no
expert. ``module:id`` names (``plain_text_env:plain_text_env/Reverse-v0``) import this module, which registers it."""

from __future__ import annotations

import string

import gymnasium as gym

WORDS = ("ab", "cat", "dog", "sun", "tree")


class Reverse(gym.Env):
    """Say the word backwards."""

    def __init__(self):
        self.observation_space = gym.spaces.Text(max_length=64, charset=string.printable)
        self.action_space = gym.spaces.Text(max_length=6, charset=string.ascii_lowercase)
        self.word = ""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.word = WORDS[int(self.np_random.integers(len(WORDS)))]
        return f"Reverse: {self.word}", {}

    def step(self, action):
        if str(action).strip() == self.word[::-1]:
            return "right", 1.0, True, False, {}
        return f"no, reverse {self.word}", 0.0, False, False, {}


if "plain_text_env/Reverse-v0" not in gym.registry:
    gym.register("plain_text_env/Reverse-v0", entry_point=Reverse, max_episode_steps=4)

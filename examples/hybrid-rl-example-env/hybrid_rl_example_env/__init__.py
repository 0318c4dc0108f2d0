"""hybrid-rl plug-in: ``from hybrid_rl import envs`` calls ``register()`` through the ``hybrid_rl.envs`` entry point.

Keep this module light: it is imported whenever hybrid-rl's environments load. The environment class
lives in its own module, which gymnasium imports only when the environment is made.
"""

import gymnasium as gym

ENV_ID = "hybrid_rl/ReverseWord-v0"


def register() -> None:
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="hybrid_rl_example_env.reverse:ReverseWord", max_episode_steps=3)

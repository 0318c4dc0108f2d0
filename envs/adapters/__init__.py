"""Environments from elsewhere, unchanged: each adapter is a ``gymnasium.Env`` you register with the
thing it wraps (docs/ENVIRONMENTS.md, "Environments as they are").

- ``LegacyStepAPI``: old gym's 4-tuple ``step`` (``legacy.py``).
- ``TRLEnv``: TRL's ``environment_factory`` objects, public methods as tools, ``get_reward()`` (``trl.py``).
- ``NemoGymEnv``: NeMo-Gym resource servers over HTTP, ``/seed_session``, tools, ``/verify`` (``nemo_gym.py``).
- ``NemoGymnasiumEnv``: NeMo-Gym ``GymnasiumServer``s over HTTP, ``/reset`` and ``/step`` (``nemo_gym.py``).
- ``SkyRLEnv``: SkyRL-Gym ``BaseTextEnv`` classes and their dataset rows, ``init`` and dict ``step`` (``skyrl.py``).
"""

from hybrid_rl.envs.adapters.legacy import LegacyStepAPI
from hybrid_rl.envs.adapters.common import load_rows, resolve_target
from hybrid_rl.envs.adapters.nemo_gym import NemoGymEnv, NemoGymError, NemoGymnasiumEnv
from hybrid_rl.envs.adapters.skyrl import SkyRLEnv, SkyRLEnvError
from hybrid_rl.envs.adapters.trl import TRLEnv

__all__ = ["LegacyStepAPI", "TRLEnv", "SkyRLEnv", "SkyRLEnvError", "NemoGymEnv", "NemoGymnasiumEnv", "NemoGymError", "resolve_target", "load_rows"]

"""Environments from elsewhere, unchanged: each adapter is a ``gymnasium.Env`` you register with the
thing it wraps (docs/ENVIRONMENTS.md, "Environments as they are").

- ``LegacyStepAPI``: old gym's 4-tuple ``step`` (``legacy.py``).
"""

from hybrid_rl.envs.adapters.legacy import LegacyStepAPI
from hybrid_rl.envs.adapters.target import resolve_target

__all__ = ["LegacyStepAPI", "resolve_target"]

"""hybrid-rl: the shared foundation (CLI, configs, run directories, logging) of the toolkit.

The model, environments, rollout, SFT and RL stages, the pipeline and the benchmarks are its subpackages
``hybrid_rl.model``, ``hybrid_rl.envs``, ``hybrid_rl.rollout``, ``hybrid_rl.sft``, ``hybrid_rl.rl``,
``hybrid_rl.pipeline`` and ``hybrid_rl.benchmarks``; the default recipes are ``hybrid_rl.configs``. In the
repository each lives in its own top-level folder (``model/``, ``envs/``, ...; pyproject.toml's
``package-dir``); see docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"

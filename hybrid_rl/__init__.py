"""hybrid-rl: the shared foundation (CLI, configs, run directories, logging) of the toolkit.

The model, environments, rollout, SFT and RL stages live in the top-level packages ``model``,
``envs``, ``rollout``, ``sft`` and ``rl``; see docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"

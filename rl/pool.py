"""Where the RL loop gets its episodes: the Ray ``rollout.RolloutPool`` or an in-process engine.

Both have the same three calls: ``push_weights(state_dict, version)``, ``run_groups(requests)`` and
``close()``. ``rollout.pool.num_workers: 0`` plays in the trainer's process (tests, debugging, one core);
the in-process pool keeps its own copy of the weights, so an async step can train while it plays.
"""

from __future__ import annotations

import copy
import logging

import torch

from rollout.config import EpisodeConfig, SamplingConfig

log = logging.getLogger("hybrid_rl.rl")


class LocalPool:
    """One ``rollout.Engine`` over a private copy of the policy, in this process."""

    def __init__(self, model, tokenizer, sampling: SamplingConfig, episode: EpisodeConfig, seed: int = 0):
        from rollout.engine import Engine

        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.engine = Engine(self.model, tokenizer, sampling, episode, worker_name="local")
        self.seed = seed

    def push_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.model.load_state_dict(state_dict)
        self.engine.policy_version = version
        # sampling depends only on (run seed, version): a resumed run draws the same episodes
        self.engine.generator.manual_seed(self.seed * 1_000_003 + version)

    def run_groups(self, requests):
        return self.engine.play(requests)

    def close(self) -> None:
        self.engine.close()


def make_pool(model, tokenizer, sampling: SamplingConfig, episode: EpisodeConfig, pool_cfg, seed: int = 0):
    """The Ray pool when ``pool_cfg.num_workers > 0`` (and ``rollout.RolloutPool`` exists), else ``LocalPool``."""
    if pool_cfg.num_workers > 0:
        try:
            from rollout import RolloutPool  # noqa: F401
        except ImportError:
            log.warning("rollout.RolloutPool is not available; playing episodes in this process instead")
        else:
            return _ray_pool(model, tokenizer, sampling, episode, pool_cfg, seed)
    return LocalPool(model, tokenizer, sampling, episode, seed)


def _ray_pool(model, tokenizer, sampling, episode, pool_cfg, seed):
    from rollout import RolloutPool

    return RolloutPool(model.config, tokenizer=tokenizer, sampling=sampling, episode=episode, pool=pool_cfg, seed=seed)

"""Where the RL loop gets its episodes: the Ray ``rollout.RolloutPool`` or an in-process engine.

Both have the same three calls: ``push_weights(state_dict, version)``, ``run_groups(requests)`` and
``close()``. ``rollout.pool.num_workers: 0`` plays in the trainer's process (tests, debugging, one core);
the in-process pool keeps its own copy of the weights, so an async step can train while it plays.
Sampling is seeded from the run seed; in process it is re-seeded from (seed, version) at every push, so
a resumed run plays exactly the episodes the uninterrupted run would have.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from model.config import HybridConfig
from rollout.config import EpisodeConfig, PoolConfig, SamplingConfig


@dataclass
class ConfigModel:
    """A picklable model builder for the Ray workers: a fresh ``HybridLM`` of this shape (weights are pushed)."""

    config: HybridConfig

    def __call__(self):
        from model import HybridLM

        return HybridLM(self.config).float()


@dataclass
class Given:
    """A picklable ``tokenizer_fn`` that hands the workers the trainer's own tokenizer."""

    tokenizer: object

    def __call__(self):
        return self.tokenizer


class LocalPool:
    """One ``rollout.Engine`` over a private copy of the policy, in this process."""

    def __init__(self, model, tokenizer, sampling: SamplingConfig, episode: EpisodeConfig, seed: int = 0):
        from rollout.engine import Engine

        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.engine = Engine(self.model, tokenizer, sampling, episode, worker_name="local")
        self.seed = seed

    def push_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.model.load_state_dict(state_dict)
        self.engine.policy_version = version
        self.engine.generator.manual_seed(self.seed * 1_000_003 + version)

    def run_groups(self, requests):
        return sorted(self.engine.play(requests), key=lambda t: (t.group_id, t.sample_index))

    def close(self) -> None:
        self.engine.close()


def make_pool(model, tokenizer, sampling: SamplingConfig, episode: EpisodeConfig, pool_cfg: PoolConfig, seed: int = 0):
    """Ray workers when ``pool_cfg.num_workers > 0``, else ``LocalPool``."""
    if pool_cfg.num_workers == 0:
        return LocalPool(model, tokenizer, sampling, episode, seed)
    from rollout import RolloutPool

    if sampling.seed is None:
        sampling = dataclasses.replace(sampling, seed=seed)
    return RolloutPool(ConfigModel(model.config), pool_cfg, sampling, episode, tokenizer_fn=Given(tokenizer))

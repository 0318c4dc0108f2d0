"""Greedy episodes on held-out seeds: the numbers the RL loop logs as eval/… and the pipeline compares.

Seeds come from ``envs.seeds(env_id, "eval", n)``, disjoint from every training seed. The episodes are
played by ``rollout.evaluate`` in this process on the model it is given; the names are those of
docs/METRICS.md (the same as the SFT stage's evals, so SFT and RL curves line up).
"""

from __future__ import annotations

import time

from hybrid_rl.metrics import env_key

NAMES = {"success_rate": "success", "return_mean": "return", "turns_mean": "turns", "invalid_actions_mean": "invalid_actions"}


def evaluate(model, tokenizer, env_ids, episodes_per_env: int, *, temperature: float = 0.0, max_new_tokens: int = 32,
             max_episode_tokens: int = 2048, seed: int = 0, split: str = "eval") -> tuple[dict[str, float], list]:
    """(eval/success/<env>, eval/return/<env>, ... and the means over envs; the trajectories)."""
    import torch

    from rollout.config import EpisodeConfig, SamplingConfig
    from rollout.evaluate import evaluate as play

    t0 = time.perf_counter()
    sampling = SamplingConfig(temperature=temperature, seed=seed)
    episode = EpisodeConfig(max_turn_tokens=max_new_tokens, max_episode_tokens=max_episode_tokens, max_batch_episodes=64)
    with torch.no_grad():
        result = play(model, tokenizer, list(env_ids), episodes=episodes_per_env, split=split, sampling=sampling, episode=episode)
    metrics = {}
    for env_id, stats in result.summary.items():
        suffix = "" if env_id == "all" else "/" + env_key(env_id)
        metrics.update({f"eval/{new}{suffix}": stats[old] for old, new in NAMES.items()})
        metrics[f"eval/env_errors{suffix}"] = stats["failed"] / max(stats["episodes"], 1)
    if len(env_ids) == 1:  # summarize gives "all" only for several envs
        metrics.update({f"eval/{new}": metrics[f"eval/{new}/{env_key(env_ids[0])}"] for new in [*NAMES.values(), "env_errors"]})
    metrics["perf/eval_s"] = time.perf_counter() - t0
    return metrics, result.trajectories

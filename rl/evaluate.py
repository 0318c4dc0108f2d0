"""Greedy episodes on held-out seeds: the numbers the RL loop logs as eval/… and the pipeline compares.

Seeds come from ``envs.seeds(env_id, "eval", n)``, disjoint from every training seed. The engine plays
in this process on the model it is given (no weight copy), with sampling seeded so that temperature > 0
evals are repeatable too.
"""

from __future__ import annotations

from hybrid_rl.metrics import env_key


def evaluate(model, tokenizer, env_ids, episodes_per_env: int, *, temperature: float = 0.0, max_new_tokens: int = 32,
             max_episode_tokens: int = 512, seed: int = 0):
    """eval/success/<env>, eval/return/<env>, eval/turns/<env> and their means over envs (eval/success, ...)."""
    import envs
    from rollout.config import EpisodeConfig, SamplingConfig
    from rollout.engine import Engine, GroupRequest

    sampling = SamplingConfig(temperature=temperature, seed=seed)
    episode = EpisodeConfig(max_turn_tokens=max_new_tokens, max_episode_tokens=max_episode_tokens,
                            max_batch_episodes=64)
    requests = [GroupRequest(env_id, s, group_id=i * episodes_per_env + j)
                for i, env_id in enumerate(env_ids) for j, s in enumerate(envs.seeds(env_id, "eval", episodes_per_env))]
    engine = Engine(model, tokenizer, sampling, episode, worker_name="eval")
    try:
        trajectories = engine.play(requests)
    finally:
        engine.close()
    return summarize(trajectories, env_ids)


def summarize(trajectories, env_ids) -> dict[str, float]:
    out: dict[str, float] = {}
    for env_id in env_ids:
        ts = [t for t in trajectories if t.env_id == env_id]
        n = max(len(ts), 1)
        out[f"eval/success/{env_key(env_id)}"] = sum(t.success for t in ts) / n
        out[f"eval/return/{env_key(env_id)}"] = sum(t.episode_return for t in ts) / n
        out[f"eval/turns/{env_key(env_id)}"] = sum(t.num_turns for t in ts) / n
    for what in ("success", "return", "turns"):
        out[f"eval/{what}"] = sum(out[f"eval/{what}/{env_key(e)}"] for e in env_ids) / len(env_ids)
    return out

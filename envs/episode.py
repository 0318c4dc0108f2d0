"""Play whole episodes: an expert's demonstrations for SFT, the checker's runs, the CLI's statistics.

An ``Episode`` keeps the conversation as chat messages (``system`` when the environment has a system
prompt, then ``user``/``tool`` observations and ``assistant`` actions), which is what SFT renders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import gymnasium as gym

from envs.registry import make, seeds

__all__ = ["Episode", "run_episode", "expert_policy", "expert_episode", "expert_stats"]


@dataclass
class Episode:
    env_id: str
    seed: int
    messages: list[dict[str, str]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)
    terminated: bool = False
    truncated: bool = False
    success: bool = False

    @property
    def episode_return(self) -> float:
        return float(sum(self.rewards))

    @property
    def num_turns(self) -> int:
        return len(self.rewards)

    def transcript(self) -> str:
        return "\n".join(f"[{m['role']}] {m['content']}" for m in self.messages)


def run_episode(env: gym.Env, act: Callable[[str], str], seed: int | None = None, options: dict | None = None) -> Episode:
    """Play one episode of ``env`` with ``act(observation) -> action`` until it terminates or truncates."""
    spec_id = env.spec.id if env.spec is not None else type(env.unwrapped).__name__
    episode = Episode(env_id=spec_id, seed=seed if seed is not None else -1)
    system_prompt = getattr(env.unwrapped, "system_prompt", None)
    if system_prompt:
        episode.messages.append({"role": "system", "content": system_prompt})
    obs, info = env.reset(seed=seed, options=options)
    episode.messages.append({"role": info.get("role", "user"), "content": obs})
    while True:
        action = act(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        episode.messages.append({"role": "assistant", "content": action})
        episode.messages.append({"role": info.get("role", "user"), "content": obs})
        episode.rewards.append(float(reward))
        episode.infos.append(info)
        if terminated or truncated:
            episode.terminated, episode.truncated = bool(terminated), bool(truncated)
            episode.success = bool(info.get("success", False))
            return episode


def expert_episode(env_id: str, seed: int, noise: float | None = None, **kwargs) -> Episode:
    """One demonstration: the environment's ``expert_action(noise=...)`` plays seed ``seed``."""
    env = make(env_id, **kwargs)
    try:
        act = expert_policy(env, noise)
        return run_episode(env, act, seed=seed)
    finally:
        env.close()


def expert_stats(env_id: str, episodes: int, split: str = "eval", noise: float | None = None, **kwargs) -> dict[str, float]:
    """The expert's success rate, mean return and mean turns over the first ``episodes`` seeds of ``split``."""
    env = make(env_id, **kwargs)
    try:
        act = expert_policy(env, noise)
        runs = [run_episode(env, act, seed=s) for s in seeds(env_id, split, episodes)]
    finally:
        env.close()
    n = max(len(runs), 1)
    return {
        "episodes": len(runs),
        "success_rate": sum(r.success for r in runs) / n,
        "mean_return": sum(r.episode_return for r in runs) / n,
        "mean_turns": sum(r.num_turns for r in runs) / n,
    }


def expert_policy(env: gym.Env, noise: float | None = None) -> Callable[[str], str]:
    """``act(observation)`` that asks the environment's expert; ``noise=None`` keeps the env's default."""
    expert = getattr(env.unwrapped, "expert_action", None)
    if expert is None:
        name = env.spec.id if env.spec else type(env.unwrapped).__name__
        raise ValueError(f"{name} has no expert_action(); add one (a scripted solver) to produce demonstrations.")
    if noise is None:
        return lambda _obs: expert()
    return lambda _obs: expert(noise=noise)

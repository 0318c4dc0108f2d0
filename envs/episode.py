"""Play whole episodes: an expert's demonstrations for SFT, the checker's runs, the CLI's statistics.

Three teachers (``policy=``): ``"expert"``, the environment's scripted solver (``expert_action``, optimal,
``noise`` makes it err at random); ``"heuristic"``, a plausible rule of thumb that is systematically worse
(``heuristic_action``: its mistakes are consistent, so a model that imitates it is about as good as it, and
RL has room above it); ``"random"``, a random legal-looking move every turn (``random_action``, by
default the expert with noise 1.0; ``noise`` is ignored; an env with neither samples its ``action_space``,
gymnasium's random agent, seeded by the episode's seed).

An ``Episode`` keeps the conversation as chat messages (``system`` when the environment has a system
prompt, then ``user``/``tool`` observations and ``assistant`` actions), which is what SFT renders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import gymnasium as gym

from hybrid_rl.envs.core import TextEnv, episode_success
from hybrid_rl.envs.registry import make, seeds
from hybrid_rl.registry import check_name

__all__ = ["Episode", "run_episode", "expert_policy", "expert_episode", "expert_stats", "POLICIES"]

POLICIES = ("expert", "heuristic", "random")


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


def run_episode(env: gym.Env, act: Callable[[str], str], seed: int | None = None, options: dict | None = None,
                max_turns: int | None = None) -> Episode:
    """Play one episode of ``env`` with ``act(observation) -> action`` until it terminates or truncates, or for at most
    ``max_turns`` turns (then it is left neither terminated nor truncated: for an env without a turn limit).

    The seed also seeds ``env.action_space``, so a policy that samples it replays the same episode; the
    system prompt is read after ``reset`` (an adapter may take it from the episode's data)."""
    spec_id = env.spec.id if env.spec is not None else type(env.unwrapped).__name__
    episode = Episode(env_id=spec_id, seed=seed if seed is not None else -1)
    obs, info = env.reset(seed=seed, options=options)
    if seed is not None:
        env.action_space.seed(seed)
    system_prompt = getattr(env.unwrapped, "system_prompt", None)
    if system_prompt:
        episode.messages.append({"role": "system", "content": system_prompt})
    episode.messages.append({"role": info.get("role", "user"), "content": obs})
    while max_turns is None or len(episode.rewards) < max_turns:
        action = act(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        episode.messages.append({"role": "assistant", "content": action})
        episode.messages.append({"role": info.get("role", "user"), "content": obs})
        episode.rewards.append(float(reward))
        episode.infos.append(info)
        if terminated or truncated:
            episode.terminated, episode.truncated = bool(terminated), bool(truncated)
            episode.success = episode_success(info, float(reward), terminated)
            return episode
    return episode


def expert_episode(env_id: str, seed: int, noise: float | None = None, policy: str = "expert", **kwargs) -> Episode:
    """One demonstration: the teacher ``policy`` (see ``POLICIES``) plays seed ``seed`` of ``env_id``."""
    _check_policy(policy)
    env = make(env_id, **kwargs)
    try:
        act = expert_policy(env, noise, policy=policy)
        return run_episode(env, act, seed=seed)
    finally:
        env.close()


def expert_stats(env_id: str, episodes: int, split: str = "eval", noise: float | None = None,
                 policy: str = "expert", **kwargs) -> dict[str, float]:
    """The teacher's success rate, mean return and mean turns over the first ``episodes`` seeds of ``split``."""
    _check_policy(policy)
    env = make(env_id, **kwargs)
    try:
        act = expert_policy(env, noise, policy=policy)
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


def expert_policy(env: gym.Env, noise: float | None = None, policy: str = "expert") -> Callable[[str], str]:
    """``act(observation)`` that asks the environment's teacher ``policy``; ``noise=None`` keeps the env's default.

    "expert": ``expert_action(noise)``; "heuristic": ``heuristic_action(noise)``; "random": ``random_action()``
    when the env has one (every ``TextEnv``), else ``expert_action(noise=1.0)``, else a sample of
    ``env.action_space`` (gymnasium's random agent); ``noise`` is ignored.
    """
    _check_policy(policy)
    unwrapped = env.unwrapped
    name = env.spec.id if env.spec else type(unwrapped).__name__
    expert = getattr(unwrapped, "expert_action", None)
    if policy == "heuristic":
        heuristic = getattr(unwrapped, "heuristic_action", None)
        if heuristic is None or not _overrides(unwrapped, "heuristic_action"):
            raise ValueError(f"{name} has no heuristic_action(), so policy='heuristic' cannot play it. Implement "
                             f"heuristic_action(self, noise=None) -> str on {type(unwrapped).__name__} (a plausible "
                             f"rule of thumb, worse than the expert; see docs/ENVIRONMENTS.md), or use "
                             f"policy='expert' or 'random'.")
        return _with_noise(heuristic, noise)
    if policy == "random":
        random_action = getattr(unwrapped, "random_action", None)
        if random_action is not None and (expert is not None or _overrides(unwrapped, "random_action")):
            return lambda _obs: random_action()
        if expert is None:  # gymnasium's random agent (run_episode seeds the space with the episode's seed)
            return lambda _obs: env.action_space.sample()
        return lambda _obs: expert(noise=1.0)
    if expert is None:
        raise ValueError(f"{name} has no expert_action(); add one (a scripted solver) to produce demonstrations.")
    return _with_noise(expert, noise)


def _overrides(env: gym.Env, method: str) -> bool:
    """True unless ``method`` is ``TextEnv``'s placeholder (a plain ``gymnasium.Env`` that has it counts)."""
    return getattr(type(env), method, None) is not getattr(TextEnv, method)


def _with_noise(action: Callable[..., str], noise: float | None) -> Callable[[str], str]:
    if noise is None:
        return lambda _obs: action()
    return lambda _obs: action(noise=noise)


def _check_policy(policy: str) -> None:
    check_name("teacher policy", policy, POLICIES)

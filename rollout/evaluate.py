"""Evaluation: play environment seeds with a policy and summarise success, return, turns and tokens.

``evaluate(model, tokenizer, env_ids, ...)`` runs in this process (no Ray): the SFT loop calls it every
N steps. ``hybrid-rl eval`` runs the same requests on the Ray workers and the same ``summarize``.
Failed episodes (env_error / timeout) are counted but left out of every mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hybrid_rl.rollout.config import EpisodeConfig, SamplingConfig
from hybrid_rl.rollout.engine import Engine, GroupRequest
from hybrid_rl.rollout.trajectory import Trajectory

GREEDY = SamplingConfig(temperature=0.0)


@dataclass
class EvalResult:
    summary: dict[str, dict[str, float]]  # env id (and "all") -> metric -> value
    trajectories: list[Trajectory] = field(default_factory=list)

    def metrics(self, section: str = "eval") -> dict[str, float]:
        """docs/METRICS.md names: ``eval/success/<env>`` ... and the mean over environments ``eval/success``."""
        return metrics_from_summary(self.summary, section)

    def table(self) -> str:
        return format_table(self.summary)


def eval_requests(env_ids: list[str], seeds: list[int] | dict[str, list[int]] | None = None, episodes: int = 8,
                  split: str = "eval") -> list[GroupRequest]:
    """One single-sample request per (env, seed); seeds default to ``envs.seeds(env_id, split, episodes)``."""
    if isinstance(env_ids, str):
        env_ids = [env_ids]
    requests = []
    for env_id in env_ids:
        if isinstance(seeds, dict):
            env_seeds = seeds[env_id]
        elif seeds is not None:
            env_seeds = list(seeds)
        else:
            from hybrid_rl import envs

            env_seeds = envs.seeds(env_id, split, episodes)  # ``module:id`` imports its module first
        requests += [GroupRequest(env_id, int(s), group_id=len(requests) + i) for i, s in enumerate(env_seeds)]
    return requests


def evaluate(model, tokenizer, env_ids, seeds=None, episodes: int = 8, split: str = "eval",
             sampling: SamplingConfig | None = None, episode: EpisodeConfig | None = None) -> EvalResult:
    """Greedy by default; in this process, no Ray."""
    engine = Engine(model, tokenizer, sampling or GREEDY, episode or EpisodeConfig())
    try:
        trajectories = engine.play(eval_requests(env_ids, seeds, episodes, split))
    finally:
        engine.close()
    trajectories.sort(key=lambda t: t.group_id)
    return EvalResult(summarize(trajectories), trajectories)


def summarize(trajectories: list[Trajectory], over_envs: bool = True) -> dict[str, dict[str, float]]:
    """Per env its figures, and with several envs ``"all"``: the mean over the envs (``over_envs``: the eval
    names, docs/METRICS.md), or over their pooled episodes (a training step's rollouts: each env plays the same
    number of groups, fewer of some kept under dynamic sampling)."""
    by_env: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        by_env.setdefault(t.env_id, []).append(t)
    out = {env_id: _stats(ts) for env_id, ts in sorted(by_env.items())}
    if len(by_env) > 1 and not over_envs:
        out["all"] = _stats(trajectories)
    elif len(by_env) > 1:  # the mean over environments, not over their pooled episodes
        per_env = list(out.values())
        out["all"] = {key: (sum(s[key] for s in per_env) if key in ("episodes", "failed")
                            else _mean_of_defined([s[key] for s in per_env])) for key in per_env[0]}
    return out


def _mean_of_defined(values: list[float]) -> float:
    """The mean of the environments' figures that are defined (an env whose every episode failed has none)."""
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def _stats(trajs: list[Trajectory]) -> dict[str, float]:
    ok = [t for t in trajs if not t.failed]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else math.nan

    return {
        "episodes": float(len(trajs)),
        "failed": float(len(trajs) - len(ok)),
        "success_rate": mean(float(t.success) for t in ok),
        "return_mean": mean(t.episode_return for t in ok),
        "turns_mean": mean(t.num_turns for t in ok),
        "tokens_mean": mean(t.num_tokens for t in ok),
        "action_tokens_mean": mean(t.num_action_tokens for t in ok),
        "invalid_actions_mean": mean(t.num_invalid_actions for t in ok),
        "truncated_rate": mean(float(t.status == "truncated") for t in ok),
        "env_errors": sum(t.status == "env_error" for t in trajs) / max(len(trajs), 1),
        "timeouts": sum(t.status == "timeout" for t in trajs) / max(len(trajs), 1),
    }


# summary key -> metric name (docs/METRICS.md)
METRIC_NAMES = {"success_rate": "success", "return_mean": "return", "turns_mean": "turns", "env_errors": "env_errors",
                "timeouts": "timeouts", "invalid_actions_mean": "invalid_actions"}


def metrics_from_summary(summary: dict[str, dict[str, float]], section: str = "eval") -> dict[str, float]:
    """``{section}/{name}/{env}`` per environment and ``{section}/{name}`` over all of them."""
    from hybrid_rl.metrics import env_key

    out: dict[str, float] = {}
    envs = [e for e in summary if e != "all"]
    for env_id in envs:
        out.update({f"{section}/{name}/{env_key(env_id.rpartition(':')[2])}": float(summary[env_id][key]) for key, name in METRIC_NAMES.items()})
    overall = summary["all"] if "all" in summary else summary[envs[0]] if envs else {}
    out.update({f"{section}/{name}": float(overall[key]) for key, name in METRIC_NAMES.items() if key in overall})
    return out


def rollout_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """The ``rollout/*`` names of a training step's episodes (docs/METRICS.md), for the RL loop.

    ``rollout/reward`` is the mean return and ``rollout/reward_components/<name>`` the mean per episode of
    each named part of it over the step's pooled episodes, ``rollout/reward_components/<name>/<env>`` the same
    per env (an env that never gives a part counts it as 0); groups are (env_id, group_id); failed episodes are
    left out of the group statistics."""
    from hybrid_rl.metrics import env_key

    out = metrics_from_summary(summarize(trajectories, over_envs=False), "rollout")
    out = {k.replace("rollout/return", "rollout/reward"): v for k, v in out.items()}
    groups: dict[tuple, list[float]] = {}
    for t in trajectories:
        if not t.failed:
            groups.setdefault((t.env_id, t.group_id), []).append(t.episode_return)
    # a group of one valid episode has no baseline either: no learning signal
    out["rollout/zero_std_groups"] = sum(max(g) == min(g) for g in groups.values()) / len(groups) if groups else math.nan
    ok = [t for t in trajectories if not t.failed]
    out["rollout/tokens_per_episode"] = sum(t.num_action_tokens for t in ok) / len(ok) if ok else math.nan
    names = sorted({name for t in ok for parts in t.reward_components for name in parts})
    by_env: dict[str, list[Trajectory]] = {}
    for t in ok:
        by_env.setdefault(t.env_id, []).append(t)
    for name in names:
        out[f"rollout/reward_components/{name}"] = _component_mean(ok, name)
        for env_id, ts in by_env.items():
            out[f"rollout/reward_components/{name}/{env_key(env_id)}"] = _component_mean(ts, name)
    return out


def _component_mean(trajectories: list[Trajectory], name: str) -> float:
    """The mean per episode of one named reward part (summed over the episode's turns)."""
    return sum(parts.get(name, 0.0) for t in trajectories for parts in t.reward_components) / len(trajectories)


def sample_row(t: Trajectory, **extra) -> dict:
    """One episode as a ``MetricsLogger.log_samples`` row (docs/METRICS.md)."""
    return {**extra, "env_id": t.env_id, "seed": t.seed, "status": t.status, "return": t.episode_return,
            "success": t.success, "num_turns": t.num_turns, "messages": t.messages}


def evaluate_policy(model, tokenizer, env_ids: list[str], episodes_per_env: int, *, max_turn_tokens: int,
                    max_episode_tokens: int = 2048, temperature: float = 0.0, split: str = "eval",
                    seed: int = 0, rollout_like: tuple[SamplingConfig, EpisodeConfig] | None = None,
                    ) -> tuple[dict[str, float], list[Trajectory]]:
    """The stages' held-out eval: ``episodes_per_env`` seeds of ``split`` per env, played in this process
    (greedy unless ``temperature``), without autograd, in eval mode -> (``eval/...`` metrics, trajectories).
    Expert loads counted while decoding are dropped (MoE balancing follows training only).

    ``rollout_like``: the training rollouts' (sampling, episode) settings, whose turn rules the eval plays by
    too: a turn ends at the same stop strings, under the same byte ban (``ascii_only``), an env gets the same
    time (``env_timeout_s``) and an unparsable action ends the episode as it did in training
    (``end_on_invalid_action``); temperature, top-p/k and the token limits stay the eval's."""
    import time

    import torch

    t0, was_training = time.perf_counter(), model.training
    rules_s, rules_e = rollout_like or (SamplingConfig(), EpisodeConfig())
    sampling = SamplingConfig(temperature=temperature, seed=seed, stop_strings=list(rules_s.stop_strings),
                              ascii_only=rules_s.ascii_only)
    episode = EpisodeConfig(max_turn_tokens=max_turn_tokens, max_episode_tokens=max_episode_tokens, max_batch_episodes=64,
                            env_timeout_s=rules_e.env_timeout_s, end_on_invalid_action=rules_e.end_on_invalid_action)
    model.eval()
    try:
        with torch.no_grad():
            result = evaluate(model, tokenizer, list(env_ids), episodes=episodes_per_env, split=split,
                              sampling=sampling, episode=episode)
    finally:
        model.train(was_training)
    if hasattr(model, "moe_balance_update"):
        model.moe_balance_update(0.0)
    metrics = metrics_from_summary(result.summary, "eval")
    metrics["perf/eval_s"] = time.perf_counter() - t0
    return metrics, result.trajectories


COLUMNS = [("episodes", "episodes", "{:.0f}"), ("failed", "failed", "{:.0f}"), ("success_rate", "success", "{:.3f}"),
           ("return_mean", "return", "{:.3f}"), ("turns_mean", "turns", "{:.2f}"), ("tokens_mean", "tokens", "{:.1f}"),
           ("action_tokens_mean", "action tok", "{:.1f}")]


def format_table(summary: dict[str, dict[str, float]]) -> str:
    header = ["env"] + [title for _, title, _ in COLUMNS]
    rows = [[env_id] + [fmt.format(stats[key]) for key, _, fmt in COLUMNS] for env_id, stats in summary.items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])

"""Advantage estimators for group-based RL: one pure function per variant, picked by name.

Every estimator maps returns to advantages, each return compared with the others of its baseline group:

    returns_n   [N] float   a return: an episode's (``algo.credit: episode``), or one turn's discounted
                            reward-to-go (``algo.credit: turn``, see ``turn_returns``)
    group_n     [N] int     baseline group id: the G samples of one prompt (episode credit), or the
                            samples of one prompt at one turn index (turn credit)
    valid_n     [N] bool    False for failed episodes (env_error / timeout): they are left out of the
                            group statistics and get advantage 0 (the loop also drops them from the loss)
    -> adv_n    [N] float

Variants (``ADVANTAGES.get(name)``):
    rloo    r - mean of the *other* valid samples   Ahmadian et al. 2024 (REINFORCE leave-one-out); the
                                                    default, as NeMo-RL's Nemotron 3 Nano recipe
    drgrpo  r - mean_g                              Liu et al. 2025, "Understanding R1-Zero-like training"
    grpo    (r - mean_g) / max(std_g, std_batch,    Shao et al. 2024, DeepSeekMath, with the floors below
                           std_floor)

Departures from the papers, and why:
- grpo's divisor is never below the std of the whole batch's returns (group mean, batch std, as the
  "Lite PPO" recipe of Liu et al. 2025, "Tricks or Traps"). The paper's group std alone turns a group
  whose returns differ only by a small shaping term (a per-turn cost on an all-fail FrozenLake group:
  -0.02 for falling at turn 2, -0.20 for surviving 20 turns) into unit-sized advantages, as large as a
  success against a failure; with the batch floor such a group keeps its true, small scale. A batch in
  which *every* group differs only by shaping terms would still get unit-scale advantages from the batch
  floor alone, so the divisor is also never below ``std_floor`` (``algo.grpo_std_floor``, default 0.25):
  for the 0/1 success rewards of the registered envs, below the std of any group of 8 whose successes
  differ (1 of 8: 0.33), so it only ever binds on groups that differ by shaping terms alone. For rewards
  on another scale, set it to about a quarter of a success's reward (0 leaves only the batch std's floor:
  no setting gives the paper's group std alone). rloo and drgrpo never rescale.
- std is the population std (divide by n, not n-1), so a group of one valid sample is well defined
  (advantage 0) instead of NaN; with all-equal returns every variant gives exactly 0.
- Failed episodes do not count as reward 0: an infrastructure failure says nothing about the policy,
  so it is neither a positive nor a negative example for the other samples of its group.

Turn credit (``turn_returns``): the return of turn t of an episode is its discounted reward-to-go
G_t = sum_{k>=t} gamma^(k-t) r_k, and its baseline group is the prompt's samples that reached turn t.
With rloo the baseline of G_t is the mean reward-to-go of the *other* samples at turn t: it is built
from independent episodes only, so it does not depend on this episode's action at turn t nor on when
this episode stops, and the policy gradient stays unbiased. The construction verl#7244 warns about,
summing per-turn-index-normalised rewards over the episode's own remaining turns, subtracts a number of
baseline terms that this episode's stopping turn decides: an action-dependent baseline, biased toward
longer or shorter episodes. A turn that no other sample reached has no baseline and gets advantage 0.
drgrpo and grpo include the sample itself in the mean (as GRPO does per episode): a scale of (n-1)/n of
rloo per turn, plus grpo's std.

State credit (``anchor_state_advantages``, ``algo.credit: state``): GiGPO's step-level advantage (Feng et al.
2025, "Group-in-Group Policy Optimization for LLM Agent Training"). The G samples of one prompt play the
same seeded episode, so when two of them see the same observation they stand in the same state (an
"anchor state"; exact for environments whose observation is their state, as FrozenLake's map with the
player on it). The turns taken from one anchor state are compared with each other: a turn's advantage is
its discounted reward-to-go minus the mean reward-to-go of the *other episodes'* turns from the same
anchor state. That isolates the move that mattered: from one square, the sample that stepped into the
hole and the one that stepped round it get opposite signs, whatever they did before. The baseline uses
other, independent episodes only (never this episode's own revisits, which its own action decides), and
the observation is part of the history before the action, so the gradient stays unbiased; an
observation that is not the state (a "higher" in GuessNumber) pools turns from different states, which
costs variance, not bias, but a harmful variance: GuessNumber's failing episodes all run to the turn limit,
so a "higher" at turn 2 has a lower reward-to-go (more turn costs ahead) than a "higher" at turn 6, and
the step advantages become "early turns bad, late turns good" whatever was guessed; with no success
signal to outweigh them, Adam scales that noise up to full-size steps (measured: entropy 0.5 -> 1.1 nats
per token and success 0.15 -> 0.07 in 80 steps). ``algo.state_key: env`` (the default) keys a turn by the
state its env named (``info["state"]``, ``TextEnv.state_key``: GuessNumber's interval) and by its
observation where the env names none. ``algo.state_key: history`` keys each turn by everything
before its action, observations and actions: the exact state of any environment that a seed makes
deterministic, with fewer matches (turns on shared prefixes only). A turn whose observation no other episode of its group saw has no step baseline and
gets step advantage 0. The loop adds it to the episode advantage: ``A = A_episode + state_weight * A_state``
(GiGPO's combination, weight 1 there). No std normalisation at the step level, whatever the estimator:
anchor groups are small and uneven, and a std of two nearly equal returns is what the grpo note warns of.

Each fast (vectorised, scatter-based) function has a naive twin (``*_naive``, Python loops over groups)
that the tests compare for values and gradients.
"""

from __future__ import annotations

from typing import Callable

import torch

from hybrid_rl.registry import Registry

AdvantageFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")
EPS = 1e-6


# ------------------------------------------------------------------------------ group statistics


def _group_stats(rewards_n, group_n, valid_n):
    """Per-episode (count, sum, mean, population std, all-equal flag) of its group's valid samples."""
    _, idx_n = torch.unique(group_n, return_inverse=True)  # dense group index 0..G-1
    num_groups = int(idx_n.max()) + 1 if idx_n.numel() else 0
    w_n = valid_n.to(rewards_n.dtype)
    r_n = rewards_n * w_n
    count_g = torch.zeros(num_groups, dtype=rewards_n.dtype).index_add(0, idx_n, w_n)
    sum_g = torch.zeros(num_groups, dtype=rewards_n.dtype).index_add(0, idx_n, r_n)
    mean_g = sum_g / count_g.clamp(min=1)
    dev_n = (rewards_n - mean_g[idx_n]) * w_n
    var_g = torch.zeros(num_groups, dtype=rewards_n.dtype).index_add(0, idx_n, dev_n**2) / count_g.clamp(min=1)
    # all-equal groups get exactly 0 (a rounded mean would leave ~1e-17 / eps = noise otherwise)
    big = torch.finfo(rewards_n.dtype).max
    r_det = rewards_n.detach()
    max_g = torch.full((num_groups,), -big, dtype=rewards_n.dtype).scatter_reduce(0, idx_n, torch.where(valid_n, r_det, -big), "amax")
    min_g = torch.full((num_groups,), big, dtype=rewards_n.dtype).scatter_reduce(0, idx_n, torch.where(valid_n, r_det, big), "amin")
    const_n = (max_g <= min_g)[idx_n]
    return count_g[idx_n], sum_g[idx_n], mean_g[idx_n], var_g.sqrt()[idx_n], const_n


@ADVANTAGES.register("rloo")
def rloo_advantages(rewards_n, group_n, valid_n):
    count_n, sum_n, _, _, const_n = _group_stats(rewards_n, group_n, valid_n)
    others_mean_n = (sum_n - rewards_n) / (count_n - 1).clamp(min=1)
    alone_n = count_n <= 1  # no other sample to compare with: no signal
    return torch.where(valid_n & ~alone_n & ~const_n, rewards_n - others_mean_n, torch.zeros_like(rewards_n))


@ADVANTAGES.register("drgrpo")
def drgrpo_advantages(rewards_n, group_n, valid_n):
    _, _, mean_n, _, const_n = _group_stats(rewards_n, group_n, valid_n)
    return torch.where(valid_n & ~const_n, rewards_n - mean_n, torch.zeros_like(rewards_n))


GRPO_STD_FLOOR = 0.25


@ADVANTAGES.register("grpo")
def grpo_advantages(rewards_n, group_n, valid_n, std_floor: float = GRPO_STD_FLOOR):
    _, _, mean_n, std_n, const_n = _group_stats(rewards_n, group_n, valid_n)
    scale_n = torch.maximum(std_n, _batch_std(rewards_n, valid_n)).clamp(min=std_floor)
    return torch.where(valid_n & ~const_n, (rewards_n - mean_n) / (scale_n + EPS), torch.zeros_like(rewards_n))


def _batch_std(rewards_n, valid_n):
    """Population std of the valid returns of the whole batch (0 when fewer than two)."""
    r_n = rewards_n[valid_n]
    return ((r_n - r_n.mean()) ** 2).mean().sqrt() if r_n.numel() > 1 else rewards_n.new_zeros(())


# ------------------------------------------------------------------------------ turn credit


def turn_returns(step_rewards: list[list[float]], gamma: float) -> list[list[float]]:
    """Per episode, the discounted reward-to-go of each turn: G_t = r_t + gamma * G_{t+1}."""
    out = []
    for rewards in step_rewards:
        g, rtg = 0.0, [0.0] * len(rewards)
        for t in range(len(rewards) - 1, -1, -1):
            g = rewards[t] + gamma * g
            rtg[t] = g
        out.append(rtg)
    return out


def turn_groups(group_ids: list[int], num_turns: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Flatten (episode, turn) pairs: (episode index, turn index, baseline group id) per pair, where the
    baseline group is (prompt group, turn index), numbered densely."""
    keys: dict[tuple[int, int], int] = {}
    episode, turn, group = [], [], []
    for i, (g, n) in enumerate(zip(group_ids, num_turns)):
        for t in range(n):
            episode.append(i)
            turn.append(t)
            group.append(keys.setdefault((g, t), len(keys)))
    return episode, turn, group


def anchor_state_advantages(returns: list[list[float]], group_ids: list[int], anchors: list[list[str]],
                            valid: list[bool]) -> tuple[list[list[float]], int]:
    """GiGPO step-level advantages (see the module docstring): per episode and turn, the turn's return minus
    the mean return of the other valid episodes' turns from the same (prompt group, observation).

    returns[e][t]  the discounted reward-to-go of turn t of episode e
    anchors[e][t]  the observation turn t answered (its anchor state key)
    -> (advantages[e][t], how many turns had a baseline from another episode)
    """
    total: dict[tuple, list[float]] = {}  # (group, anchor) -> [sum, count]
    own: dict[tuple, list[float]] = {}  # (group, anchor, episode) -> [sum, count]
    for e, (g, rets, keys) in enumerate(zip(group_ids, returns, anchors)):
        if not valid[e]:
            continue
        for r, key in zip(rets, keys):
            for table, k in ((total, (g, key)), (own, (g, key, e))):
                acc = table.setdefault(k, [0.0, 0.0])
                acc[0] += r
                acc[1] += 1
    out, anchored = [], 0
    for e, (g, rets, keys) in enumerate(zip(group_ids, returns, anchors)):
        adv = [0.0] * len(rets)
        if valid[e]:
            for t, (r, key) in enumerate(zip(rets, keys)):
                s_all, n_all = total[(g, key)]
                s_own, n_own = own[(g, key, e)]
                if n_all > n_own:
                    adv[t] = r - (s_all - s_own) / (n_all - n_own)
                    anchored += 1
        out.append(adv)
    return out, anchored


def anchor_state_advantages_naive(returns, group_ids, anchors, valid):
    """The same, by looping over every pair of turns."""
    out, anchored = [], 0
    for e in range(len(returns)):
        adv = [0.0] * len(returns[e])
        for t in range(len(returns[e]) if valid[e] else 0):
            others = [returns[f][u] for f in range(len(returns)) if f != e and valid[f] and group_ids[f] == group_ids[e]
                      for u in range(len(returns[f])) if anchors[f][u] == anchors[e][t]]
            if others:
                adv[t] = returns[e][t] - sum(others) / len(others)
                anchored += 1
        out.append(adv)
    return out, anchored


def turn_observations(messages: list[dict], num_turns: int, key: str = "observation",
                      states: list[str] | None = None) -> list[str]:
    """Per action turn, its anchor-state key. ``observation``: the observation it answered (the last
    non-assistant message before the turn's assistant message; a system prompt counts only when no
    observation follows it). ``history``: everything before the turn's action, observations and actions
    (for environments whose observation is not their state). ``env``: the state the env named
    (``Trajectory.states``, from ``info["state"]``) where it named one, else the observation."""
    if key == "env":
        observed = turn_observations(messages, num_turns, "observation")
        named = list(states or [])[:num_turns]
        return [f"\x1dstate\x1f{s}" if s else o for s, o in zip(named + [""] * (num_turns - len(named)), observed)]
    out, last, seen = [], "", []
    for m in messages:
        if m.get("role") == "assistant":
            out.append(last if key == "observation" else "\x1e".join(seen))
        else:
            last = m.get("content", "")
        seen.append(f"{m.get('role')}\x1f{m.get('content', '')}")
    pad = last if key == "observation" else "\x1e".join(seen)
    return (out + [pad] * num_turns)[:num_turns]


# ------------------------------------------------------------------------------ naive twins


def _groups_naive(group_n, valid_n):
    groups: dict[int, list[int]] = {}
    for i, (g, ok) in enumerate(zip(group_n.tolist(), valid_n.tolist())):
        if ok:
            groups.setdefault(g, []).append(i)
    return groups


def grpo_advantages_naive(rewards_n, group_n, valid_n):
    out = [rewards_n[0] * 0] * len(rewards_n)
    every = [rewards_n[i] for i in range(len(rewards_n)) if valid_n[i]]
    batch_mean = sum(every) / max(len(every), 1)
    batch_std = (sum((r - batch_mean) ** 2 for r in every) / len(every)) ** 0.5 if len(every) > 1 else rewards_n[0] * 0
    for members in _groups_naive(group_n, valid_n).values():
        rs = [rewards_n[i] for i in members]
        if len(set(float(r.detach()) for r in rs)) == 1:
            continue
        mean = sum(rs) / len(rs)
        std = (sum((r - mean) ** 2 for r in rs) / len(rs)) ** 0.5 if len(rs) > 1 else rs[0] * 0
        scale = std if float(std.detach()) >= float(batch_std.detach()) else batch_std
        for i in members:
            out[i] = (rewards_n[i] - mean) / (scale + EPS)
    return torch.stack(out)


def drgrpo_advantages_naive(rewards_n, group_n, valid_n):
    out = [rewards_n[0] * 0] * len(rewards_n)
    for members in _groups_naive(group_n, valid_n).values():
        if len(set(float(rewards_n[i].detach()) for i in members)) == 1:
            continue
        mean = sum(rewards_n[i] for i in members) / len(members)
        for i in members:
            out[i] = rewards_n[i] - mean
    return torch.stack(out)


def rloo_advantages_naive(rewards_n, group_n, valid_n):
    out = [rewards_n[0] * 0] * len(rewards_n)
    for members in _groups_naive(group_n, valid_n).values():
        if len(members) < 2 or len(set(float(rewards_n[i].detach()) for i in members)) == 1:
            continue
        for i in members:
            others = [rewards_n[j] for j in members if j != i]
            out[i] = rewards_n[i] - sum(others) / len(others)
    return torch.stack(out)


NAIVE = {"grpo": grpo_advantages_naive, "drgrpo": drgrpo_advantages_naive, "rloo": rloo_advantages_naive}

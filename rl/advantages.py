"""Advantage estimators for group-based RL: one pure function per variant, picked by name.

Every estimator maps the episode returns of a batch of groups to one advantage per episode:

    rewards_n   [N] float   episode return of each trajectory
    group_n     [N] int     group id (the G samples of one prompt share an id)
    valid_n     [N] bool    False for failed episodes (env_error / timeout): they are left out of the
                            group statistics and get advantage 0 (the loop also drops them from the loss)
    -> adv_n    [N] float

Variants (``ADVANTAGES[name]``):
    grpo   (r - mean_g) / (std_g + eps)            Shao et al. 2024, DeepSeekMath
    drgrpo  r - mean_g                              Liu et al. 2025, "Understanding R1-Zero-like training"
    rloo    r - mean of the *other* valid samples   Ahmadian et al. 2024 (REINFORCE leave-one-out)

Departures from the GRPO paper, and why:
- std is the population std (divide by n, not n-1), so a group of one valid sample is well defined
  (advantage 0) instead of NaN; with all-equal rewards every variant gives exactly 0.
- Failed episodes do not count as reward 0: an infrastructure failure says nothing about the policy,
  so it is neither a positive nor a negative example for the other samples of its group.

Each fast (vectorised, scatter-based) function has a naive twin (``*_naive``, Python loops over groups)
that the tests compare for values and gradients.
"""

from __future__ import annotations

import difflib
from typing import Callable

import torch

AdvantageFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}
EPS = 1e-6


def register_advantage(name: str):
    def wrap(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn

    return wrap


def get_advantage_fn(name: str) -> AdvantageFn:
    if name not in ADVANTAGES:
        close = difflib.get_close_matches(name, ADVANTAGES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown advantage estimator {name!r}.{hint} Valid: {', '.join(ADVANTAGES)}.")
    return ADVANTAGES[name]


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


@register_advantage("grpo")
def grpo_advantages(rewards_n, group_n, valid_n):
    _, _, mean_n, std_n, const_n = _group_stats(rewards_n, group_n, valid_n)
    return torch.where(valid_n & ~const_n, (rewards_n - mean_n) / (std_n + EPS), torch.zeros_like(rewards_n))


@register_advantage("drgrpo")
def drgrpo_advantages(rewards_n, group_n, valid_n):
    _, _, mean_n, _, const_n = _group_stats(rewards_n, group_n, valid_n)
    return torch.where(valid_n & ~const_n, rewards_n - mean_n, torch.zeros_like(rewards_n))


@register_advantage("rloo")
def rloo_advantages(rewards_n, group_n, valid_n):
    count_n, sum_n, _, _, const_n = _group_stats(rewards_n, group_n, valid_n)
    others_mean_n = (sum_n - rewards_n) / (count_n - 1).clamp(min=1)
    alone_n = count_n <= 1  # no other sample to compare with: no signal
    return torch.where(valid_n & ~alone_n & ~const_n, rewards_n - others_mean_n, torch.zeros_like(rewards_n))


# ------------------------------------------------------------------------------ naive twins


def _groups_naive(group_n, valid_n):
    groups: dict[int, list[int]] = {}
    for i, (g, ok) in enumerate(zip(group_n.tolist(), valid_n.tolist())):
        if ok:
            groups.setdefault(g, []).append(i)
    return groups


def grpo_advantages_naive(rewards_n, group_n, valid_n):
    out = [rewards_n[0] * 0] * len(rewards_n)
    for members in _groups_naive(group_n, valid_n).values():
        rs = [rewards_n[i] for i in members]
        if len(set(float(r.detach()) for r in rs)) == 1:
            continue
        mean = sum(rs) / len(rs)
        std = (sum((r - mean) ** 2 for r in rs) / len(rs)) ** 0.5 if len(rs) > 1 else rs[0] * 0
        for i in members:
            out[i] = (rewards_n[i] - mean) / (std + EPS)
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

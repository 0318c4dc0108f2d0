"""Advantage estimators: fast vs naive twin (values and gradients), and the properties the loop relies on."""

from __future__ import annotations

import pytest
import torch

from hybrid_rl.rl.advantages import ADVANTAGES, NAIVE


def _batch(seed=0, groups=5, per_group=4):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(groups * per_group, generator=g, dtype=torch.float64)
    rewards[:per_group] = 0.7  # one all-equal group
    group = torch.arange(groups).repeat_interleave(per_group) * 3 + 11  # ids need not be dense
    perm = torch.randperm(len(group), generator=g)  # groups need not be contiguous
    valid = torch.rand(len(group), generator=g) > 0.2
    return rewards[perm], group[perm], valid[perm]


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_fast_matches_naive_values_and_gradients(name):
    rewards, group, valid = _batch()
    r1 = rewards.clone().requires_grad_(True)
    r2 = rewards.clone().requires_grad_(True)
    a1 = ADVANTAGES.get(name)(r1, group, valid)
    a2 = NAIVE[name](r2, group, valid)
    torch.testing.assert_close(a1, a2)
    w = torch.randn(len(rewards), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (a1 * w).sum().backward()
    (a2 * w).sum().backward()
    torch.testing.assert_close(r1.grad, r2.grad)


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_all_equal_group_gives_exactly_zero(name):
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.0], dtype=torch.float32)
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = ADVANTAGES.get(name)(rewards, group, torch.ones(6, dtype=torch.bool))
    assert torch.equal(adv[:3], torch.zeros(3))
    assert adv[3] > 0 and adv[4] < 0


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_failed_episodes_are_excluded(name):
    # a failed episode with reward 0 must not change its group's advantages nor get one itself
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    group = torch.zeros(5, dtype=torch.long)
    valid = torch.tensor([True, True, True, True, False])
    adv = ADVANTAGES.get(name)(rewards, group, valid)
    ref = ADVANTAGES.get(name)(rewards[:4], group[:4], valid[:4])
    torch.testing.assert_close(adv[:4], ref)
    assert adv[4] == 0


def test_known_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    group = torch.zeros(4, dtype=torch.long)
    valid = torch.ones(4, dtype=torch.bool)
    torch.testing.assert_close(ADVANTAGES.get("drgrpo")(rewards, group, valid), torch.tensor([0.75, -0.25, -0.25, -0.25]))
    torch.testing.assert_close(ADVANTAGES.get("rloo")(rewards, group, valid), torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    std = (0.75**2 + 3 * 0.25**2) / 4
    torch.testing.assert_close(ADVANTAGES.get("grpo")(rewards, group, valid), torch.tensor([0.75, -0.25, -0.25, -0.25]) / std**0.5, atol=1e-5, rtol=1e-5)


def test_unknown_name_suggests():
    with pytest.raises(ValueError, match="Did you mean 'rloo'"):
        ADVANTAGES.get("rlo")

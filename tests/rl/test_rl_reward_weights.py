"""Reward components as the RL loop sees them: weights from the config recombine each turn's named parts,
each part is logged as its own series, and a bad or unknown weight is reported."""

from __future__ import annotations

import logging
import math

import pytest

from hybrid_rl.config import load_config
from hybrid_rl.rl.config import RLStageConfig
from hybrid_rl.rl.train import check_reward_weights, token_advantages, turn_rewards, weighted_rewards
from hybrid_rl.rollout.evaluate import rollout_metrics
from hybrid_rl.rollout.trajectory import Trajectory


def _cfg(*overrides):
    return load_config(RLStageConfig, None, ["rollout.max_episode_tokens=64", "train.micro_batch_tokens=256", *overrides])


def _episode(sample, parts, success):
    """One action token and one observation token per turn; ``parts``: each turn's reward components."""
    ids, action = [1], [0]
    for _ in parts:
        ids, action = ids + [7, 4], action + [1, 0]
    rewards = [sum(p.values()) for p in parts]
    return Trajectory(env_id="hybrid_rl/Buttons-v0", seed=0, group_id=0, sample_index=sample, status="terminated",
                      token_ids=ids, is_action=action, logprobs=[0.0] * len(ids), sample_logprobs=[0.0] * len(ids),
                      policy_version=[0] * len(ids), step_rewards=rewards, reward_components=parts,
                      episode_return=sum(rewards), success=success, num_turns=len(parts))


def _fail(sample, turns):  # an all-fail group that differs only by how many turns each episode cost
    return _episode(sample, [{"turn": -0.02}] * turns, success=False)


def test_weights_recombine_each_turns_components():
    t = _episode(0, [{"turn": -0.02, "invalid": -0.05}, {"turn": -0.02, "success": 1.0}], success=True)
    assert weighted_rewards(t, {"turn": 0.0, "invalid": 2.0}) == pytest.approx([-0.1, 1.0])
    assert turn_rewards(t, _cfg("algo.reward_weights={turn: 0.5}").algo) == pytest.approx([-0.06, 0.99])
    assert turn_rewards(t, _cfg().algo) == pytest.approx(t.step_rewards)  # no weights: the env's own rewards


def test_a_zero_turn_weight_removes_the_shaping_signal_of_an_all_fail_group():
    group = [_fail(i, n) for i, n in enumerate([2, 5, 9, 16])]
    plain, _ = token_advantages(group, _cfg().algo)
    assert any(a != 0 for adv in plain for a in adv)  # shorter failures look better than longer ones
    weighted, _ = token_advantages(group, _cfg("algo.reward_weights={turn: 0.0}").algo)
    assert all(a == 0 for adv in weighted for a in adv)


def test_each_component_is_logged_as_its_own_series():
    trajs = [_episode(0, [{"turn": -0.02}, {"turn": -0.02, "success": 1.0}], success=True), _fail(1, 3)]
    row = rollout_metrics(trajs)
    assert row["rollout/reward_components/turn"] == pytest.approx((-0.04 - 0.06) / 2)
    assert row["rollout/reward_components/success"] == pytest.approx(0.5)
    assert row["rollout/reward_components/turn/Buttons-v0"] == pytest.approx((-0.04 - 0.06) / 2)


def test_each_component_is_also_logged_per_env_and_an_env_without_it_counts_zero():
    other = _episode(2, [{"turn": -0.5}], success=False)
    other.env_id = "mypkg.envs:Maze-v3"
    trajs = [_episode(0, [{"turn": -0.02}, {"turn": -0.02, "success": 1.0}], success=True), _fail(1, 3), other]
    row = rollout_metrics(trajs)
    assert row["rollout/reward_components/success/Buttons-v0"] == pytest.approx(0.5)
    assert row["rollout/reward_components/success/Maze-v3"] == 0.0  # the part is named by another env only
    assert row["rollout/reward_components/turn/Maze-v3"] == pytest.approx(-0.5)
    assert row["rollout/reward_components/turn"] == pytest.approx((-0.04 - 0.06 - 0.5) / 3)  # pooled episodes


def test_a_weight_that_is_not_a_number_is_rejected():
    with pytest.raises(ValueError, match="reward_weights.*finite"):
        _cfg("algo.reward_weights={turn: .nan}")
    assert math.isfinite(_cfg("algo.reward_weights={turn: 0.5}").algo.reward_weights["turn"])


def test_a_weight_no_episode_reported_is_warned_about_with_the_closest_name(caplog):
    trajs = [_episode(0, [{"turn": -0.02, "success": 1.0}], success=True)]
    with caplog.at_level(logging.WARNING, logger="hybrid_rl.rl"):
        check_reward_weights(trajs, _cfg("algo.reward_weights={sucess: 2.0, turn: 0.5}").algo)
    assert caplog.text.count("algo.reward_weights names") == 1  # turn was reported: only the typo is warned about
    assert "'sucess'" in caplog.text and "did you mean 'success'" in caplog.text

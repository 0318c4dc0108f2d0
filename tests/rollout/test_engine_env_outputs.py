"""Malformed environment outputs end only their own episode (status ``env_error``, a message in ``traj.error``):
ambiguous flags (arrays for ``terminated`` / ``truncated`` / ``info["success"]`` / ``info["invalid_action"]``),
observations that are not valid UTF-8 text (lone surrogates), non-finite or non-numeric reward components; and
an env id whose arguments hold a ':' is not split as ``module:id``."""

import json
import math

import numpy as np
import pytest

from helpers import TOK, make_model
from hybrid_rl.benchmarks.fixed_turns import FIXED_TURNS_ID, FixedTurnsEnv
from hybrid_rl.rollout.config import EpisodeConfig, SamplingConfig
from hybrid_rl.rollout.engine import Engine, GroupRequest


def play(requests, episode=None):
    engine = Engine(make_model("toy"), TOK, SamplingConfig(seed=0, ascii_only=True),
                    episode or EpisodeConfig(max_turn_tokens=6, max_batch_episodes=4))
    try:
        return engine.play(requests)
    finally:
        engine.close()


def groups(n, turns=2):
    return [GroupRequest(FIXED_TURNS_ID, seed=s, group_id=s, env_kwargs={"turns": turns}) for s in range(n)]


def by_seed(trajs):
    out = {t.seed: t for t in trajs}
    assert len(out) == len(trajs)
    return out


# values that must keep working as bools: numpy bools, 0-d arrays, python ints 0/1
GOOD_FLAGS = {0: (np.bool_, np.bool_), 2: (lambda v: np.array(v), int)}


@pytest.mark.parametrize("where, bad", [
    ("terminated", np.array([False, True])),
    ("truncated", np.array([False, True])),
    ("success", np.array([1, 0])),
    ("invalid_action", np.array([1, 0])),
])
def test_an_ambiguous_flag_is_an_env_error_of_its_episode_only(monkeypatch, where, bad):
    """An array where a bool belongs (``if terminated`` raises 'truth value ... is ambiguous') ends its own
    episode with a message naming the value; numpy bools, 0-d arrays and ints 0/1 still play as bools."""
    step = FixedTurnsEnv.step

    def odd_step(self, action):
        obs, r, terminated, truncated, info = step(self, action)
        if self._seed == 1:
            last = self._t >= self.turns
            if where == "terminated":
                terminated = bad if last else False
            elif where == "truncated":
                truncated = bad
            elif where == "success":
                info["success"] = bad
            else:
                info["invalid_action"] = bad
        elif self._seed in GOOD_FLAGS:  # the good episodes give their flags as other bool-likes
            as_flag, as_info = GOOD_FLAGS[self._seed]
            terminated, truncated = as_flag(bool(terminated)), as_flag(False)
            info["invalid_action"] = as_info(False)
            if "success" in info:
                info["success"] = as_info(info["success"])
        return obs, r, terminated, truncated, info

    monkeypatch.setattr(FixedTurnsEnv, "step", odd_step)
    trajs = by_seed(play(groups(3)))
    bad_traj = trajs[1]
    assert bad_traj.status == "env_error"
    assert where in bad_traj.error and "array" in bad_traj.error and "expected a bool" in bad_traj.error
    for seed in (0, 2):
        good = trajs[seed]
        assert good.status == "terminated" and good.error in (None, "") and good.num_turns == 2
        assert good.num_invalid_actions == 0 and isinstance(good.success, bool)


@pytest.mark.parametrize("where", ["reset", "step"])
def test_an_observation_with_a_lone_surrogate_is_an_env_error_of_its_episode_only(monkeypatch, where):
    """Text decoded with ``errors='surrogateescape'`` holds lone surrogates that no tokenizer can encode: its
    episode ends with a message saying so (and how to decode instead); the other episodes play on."""
    reset, step = FixedTurnsEnv.reset, FixedTurnsEnv.step

    def odd_reset(self, *, seed=None, options=None):
        obs, info = reset(self, seed=seed, options=options)
        return ("bad \ud800 obs" if where == "reset" and seed == 1 else obs), info

    def odd_step(self, action):
        obs, r, terminated, truncated, info = step(self, action)
        return ("bad \udc80 obs" if where == "step" and self._seed == 1 else obs), r, terminated, truncated, info

    monkeypatch.setattr(FixedTurnsEnv, "reset", odd_reset)
    monkeypatch.setattr(FixedTurnsEnv, "step", odd_step)
    trajs = by_seed(play(groups(3, turns=3)))
    bad = trajs[1]
    assert bad.status == "env_error"
    assert f"env.{where}" in bad.error and "not valid UTF-8" in bad.error and "errors='replace'" in bad.error
    assert bad.num_turns == (0 if where == "reset" else 1)
    for seed in (0, 2):
        assert trajs[seed].status == "terminated" and trajs[seed].num_turns == 3


@pytest.mark.parametrize("components, named", [
    ({"a": float("inf"), "b": 1.0}, "'a'"),
    ({"a": 0.0, "b": float("nan")}, "'b'"),
    ({"a": 0.0, "b": "0.5"}, "'b'"),
    ({"a": None}, "'a'"),
])
def test_a_non_finite_or_non_numeric_reward_component_is_an_env_error_of_its_episode_only(monkeypatch, components, named):
    """Reward components are weighted into the advantages (``rl.advantages``): a NaN or infinite one would make
    every advantage of its batch NaN, so it ends its own episode like a non-finite reward does."""
    step = FixedTurnsEnv.step

    def odd_step(self, action):
        obs, r, terminated, truncated, info = step(self, action)
        if self._seed == 1:
            r, info["reward_components"] = 0.0, dict(components)
        return obs, r, terminated, truncated, info

    monkeypatch.setattr(FixedTurnsEnv, "step", odd_step)
    trajs = by_seed(play(groups(3)))
    bad = trajs[1]
    assert bad.status == "env_error" and "reward component" in bad.error and named in bad.error
    assert bad.reward_components == [] and bad.step_rewards == []
    for seed in (0, 2):
        good = trajs[seed]
        assert good.status == "terminated"
        assert all(math.isfinite(v) for parts in good.reward_components for v in parts.values())


def test_rewards_and_components_held_in_0d_arrays_and_tensors_are_numbers(monkeypatch):
    """``np.float32(1)`` always played; a 0-d array or a one-number tensor (what a reward computed with numpy or
    torch often is) was called "not a finite number" and ended its episode. A 0-d array of text still is an error."""
    import torch

    step = FixedTurnsEnv.step

    def odd_step(self, action):
        obs, r, terminated, truncated, info = step(self, action)
        if self._seed == 1:
            r, info["reward_components"] = np.array(0.25), {"a": torch.tensor(0.5), "b": np.array(-1.0)}
        if self._seed == 2:
            info["reward_components"] = {"a": np.array("0.5")}
        return obs, r, terminated, truncated, info

    monkeypatch.setattr(FixedTurnsEnv, "step", odd_step)
    trajs = by_seed(play(groups(3)))
    assert trajs[1].status == "terminated", trajs[1].error
    assert trajs[1].reward_components == [{"a": 0.5, "b": -1.0}] * 2 and trajs[1].step_rewards == [0.25, 0.25]
    assert trajs[2].status == "env_error" and "reward component 'a'" in trajs[2].error


def test_an_env_id_whose_argument_holds_a_colon_is_not_split_as_module_id(tmp_path):
    """``module:id`` imports ``module``; a ':' inside the arguments (a path) is part of an argument."""
    folder = tmp_path / "x:1"
    folder.mkdir()
    path = folder / "math.jsonl"
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(10)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    env_id = f"hybrid_rl/Dataset-v0(path={path};prompt_key=question;reference_format=hashes)"
    trajs = play([GroupRequest(env_id, seed=s, group_id=s, num_samples=2) for s in range(2)],
                 EpisodeConfig(max_turn_tokens=6, max_batch_episodes=4, max_episode_tokens=512))
    assert len(trajs) == 4
    assert all(t.status == "terminated" and t.num_turns == 1 for t in trajs), [(t.status, t.error) for t in trajs]
    assert all("What is" in t.messages[1]["content"] or "What is" in t.messages[0]["content"] for t in trajs)


@pytest.mark.parametrize("reward", [10 ** 400, float("inf"), -float("inf")])
def test_a_reward_past_a_float_s_range_is_an_env_error_of_its_episode_only(monkeypatch, reward):
    """A Python int reward too large for a float raised OverflowError out of ``play`` (the whole batch)."""
    step = FixedTurnsEnv.step

    def odd_step(self, action):
        obs, r, terminated, truncated, info = step(self, action)
        return obs, (reward if self._seed == 1 else r), terminated, truncated, info

    monkeypatch.setattr(FixedTurnsEnv, "step", odd_step)
    trajs = by_seed(play(groups(3)))
    assert trajs[1].status == "env_error" and "expected a finite number" in trajs[1].error, trajs[1].error
    assert all(trajs[seed].status == "terminated" for seed in (0, 2))

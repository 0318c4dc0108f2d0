"""A SkyRL-Gym BaseTextEnv (tests/envs/adapter_test_envs.py: SkyGuess, made from its dataset row's extras) plays
through SkyRLEnv: init's prompt, dict steps, done and reward; other shapes name what is wrong; the checker passes
it and RL trains on it; registered without the adapter, the error names it."""

from __future__ import annotations

import gymnasium as gym
import pytest

import adapter_test_envs
from hybrid_rl import envs
from hybrid_rl.cli import main
from hybrid_rl.config import ConfigError
from hybrid_rl.envs.adapters import SkyRLEnv, SkyRLEnvError
from hybrid_rl.metrics import read_metrics
from test_envs_plain import RL_SMOKE

SKY_ID = "adapter_test_envs:adapter_test_envs/SkyGuess-v0"


def test_an_episode_of_a_skyrl_env():
    env = SkyRLEnv(adapter_test_envs.SkyGuess, adapter_test_envs.SKY_ROWS, env_config={"max_turns": 3})
    obs, info = env.reset(seed=1)
    target = env.inner.target
    assert obs == "Guess my number (1-9)." and info["role"] == "user" and env.system_prompt == "Answer with one digit."
    wrong = 1 if target != 1 else 2
    assert env.step(f"I guess {wrong}")[:4] == ("higher" if wrong < target else "lower", 0.0, False, False)
    obs, reward, terminated, _, info = env.step(str(target))
    assert (reward, terminated, info["success"], info["reward_components"]) == (1.0, True, True, {"reward": 1.0})
    first = env.inner
    env.reset(seed=1)
    assert first.closed and env.inner is not first  # one env per episode, as SkyRL makes them
    assert [env.step("0")[2] for _ in range(3)] == [False, False, True]  # env_config reached the env: max_turns=3


class _BadReward(adapter_test_envs.SkyGuess):
    def step(self, action):
        return {"observations": [], "reward": "1", "done": True, "metadata": {}}


class _BadObservations(adapter_test_envs.SkyGuess):
    def step(self, action):
        return {"observations": "higher", "reward": 0.0, "done": False, "metadata": {}}


@pytest.mark.parametrize("cls, message", [
    (_BadReward, "_BadReward.step returned reward '1'; expected a finite number"),
    (_BadObservations, "_BadObservations.step returned observations higher; expected a list of messages"),
])
def test_a_step_of_another_shape_names_what_is_wrong(cls, message):
    env = SkyRLEnv(cls, adapter_test_envs.SKY_ROWS)
    env.reset(seed=0)
    with pytest.raises(SkyRLEnvError, match=message):
        env.step("5")


@pytest.mark.parametrize("kwargs, message", [
    ({"env": "adapter_test_envs:SkyGues", "rows": adapter_test_envs.SKY_ROWS}, "Did you mean adapter_test_envs:SkyGuess?"),
    ({"env": adapter_test_envs.SkyGuess, "rows": [{"question": "?"}]}, "rows [0] have no prompt"),
    ({"env": adapter_test_envs.Vault, "rows": adapter_test_envs.SKY_ROWS}, "Vault has no init()"),
])
def test_bad_adapter_input_names_the_problem_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?").replace("[", r"\[")):
        SkyRLEnv(**kwargs)


def test_skyrl_env_passes_the_check_and_trains_with_rl(tmp_path, monkeypatch):
    report = envs.check(SKY_ID, episodes=3)
    assert report.passed, report.format()
    monkeypatch.chdir(tmp_path)
    assert main(["rl", *RL_SMOKE, f"envs=[{SKY_ID}]", "run.name=sky"]) == 0
    rows = read_metrics(tmp_path / "runs" / "sky")
    assert [r["step"] for r in rows if "rollout/reward" in r] == [1, 2]
    assert all(r["rollout/env_errors"] == 0.0 for r in rows if "rollout/env_errors" in r)


def test_a_skyrl_class_registered_without_the_adapter_is_told_to_use_it():
    gym.register("adapter_test_envs/SkyGuessRaw-v0", entry_point=adapter_test_envs.SkyGuess)
    try:
        with pytest.raises(ConfigError, match="SkyRL-Gym BaseTextEnv.*entry_point='hybrid_rl.envs.adapters:SkyRLEnv'"):
            envs.check_env_ids(["adapter_test_envs/SkyGuessRaw-v0"])
    finally:
        gym.registry.pop("adapter_test_envs/SkyGuessRaw-v0", None)


class _NumpyStep(adapter_test_envs.SkyGuess):
    def step(self, action):
        import numpy as np

        return {"observations": [], "reward": np.float32(1.0), "done": np.True_, "metadata": {}}


def test_numpy_values_are_read_as_the_engine_reads_them():
    env = SkyRLEnv(_NumpyStep, adapter_test_envs.SKY_ROWS)
    env.reset(seed=0)
    assert env.step("5")[1:3] == (1.0, True)

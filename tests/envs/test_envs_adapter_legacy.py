"""An old gym env (4-tuple step, reset -> obs, seed()) plays through LegacyStepAPI: the checker passes it,
RL trains on it; without the adapter the checker names the adapter; a bad target says how to write one."""

from __future__ import annotations

import json

import pytest

import adapter_test_envs
from hybrid_rl import envs
from hybrid_rl.cli import main
from hybrid_rl.envs.adapters import LegacyStepAPI
from hybrid_rl.metrics import read_metrics
from test_envs_plain import RL_SMOKE

OLD_ID = "adapter_test_envs:adapter_test_envs/OldReverse-v0"


def test_old_step_api_becomes_terminated_or_truncated():
    env = LegacyStepAPI(adapter_test_envs.OldReverse, {"turns": 2})
    obs, info = env.reset(seed=3)
    assert obs.startswith("Reverse: ") and info == {}
    assert env.reset(seed=3)[0] == obs  # the seed reaches the old env's seed()
    word = obs.split()[-1]
    assert env.step("x") == (f"no, reverse {word}", 0.0, False, False, {})
    assert env.step("x") == (f"no, reverse {word}", 0.0, False, True, {})  # old TimeLimit.truncated: truncation
    env.reset(seed=3)
    assert env.step(word[::-1]) == ("right", 1.0, True, False, {})
    assert env.turns == 2  # the old env's attributes show through
    assert env.observation_space.contains(obs)


def test_old_env_passes_the_check_through_the_adapter_and_without_it_the_errors_name_it():
    report = envs.check(OLD_ID, episodes=3)
    assert report.passed, report.format()
    with pytest.raises(TypeError, match="plays through an adapter.*entry_point='hybrid_rl.envs.adapters:LegacyStepAPI'"):
        envs.make("adapter_test_envs/OldReverseRaw-v0")
    half = envs.check("adapter_test_envs/HalfPorted-v0", episodes=3)
    assert "old gym 4-tuple" in half.results["gymnasium"] and "LegacyStepAPI" in half.results["gymnasium"]


@pytest.mark.parametrize("target, message", [
    ("adapter_test_envs.OldReverse", "not a target; give LegacyStepAPI env a class or factory, or its import path as 'module:Name'"),
    ("no_such_module_xyz:OldReverse", "cannot import 'no_such_module_xyz'"),
    ("adapter_test_envs:OldReverze", "has no 'OldReverze'. Did you mean adapter_test_envs:OldReverse?"),
    ("adapter_test_envs:WORDS", "is a tuple, not a class or factory"),
])
def test_bad_target_names_the_problem_and_the_fix(target, message):
    with pytest.raises(ValueError) as err:
        LegacyStepAPI(target)
    assert message in str(err.value)


def test_old_env_trains_with_rl(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["rl", *RL_SMOKE, f"envs=[{OLD_ID}]", "run.name=old"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"].endswith("step_2")
    rows = read_metrics(tmp_path / "runs" / "old")
    assert [r["step"] for r in rows if "rollout/reward" in r] == [1, 2]
    assert "rollout/success/adapter_test_envs.OldReverse-v0" in rows[-1]

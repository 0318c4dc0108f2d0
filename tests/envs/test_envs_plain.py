"""A gymnasium text env as it is (tests/envs/plain_text_env.py: none of hybrid-rl's info keys, no expert)
passes the checker with warnings and trains; the checker still fails real contract breaks."""

from __future__ import annotations

import json

import gymnasium as gym
import pytest

import plain_text_env
from hybrid_rl import envs
from hybrid_rl.cli import main
from hybrid_rl.metrics import read_metrics

PLAIN_ID = "plain_text_env:plain_text_env/Reverse-v0"
# a micro policy from scratch, tiny groups, in-process rollouts (tests/rl/test_rl_cli.py's smoke run)
RL_SMOKE = ["init_from=", "algo.mode=sync", "algo.updates_per_batch=1", "model.preset=micro", "model.hidden_size=64",
            "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.max_turn_tokens=3",
            "rollout.max_episode_tokens=256", "rollout.pool.num_workers=0", "train.micro_batch_tokens=512",
            "eval.episodes_per_env=2", "eval.every_steps=0", "logging.backends=[jsonl]", "logging.report=false",
            "run.quiet=true", "train.steps=2"]


def test_success_defaults_to_terminated_with_a_positive_reward():
    assert envs.episode_success({}, 1.0, True)
    assert not envs.episode_success({}, 1.0, False)  # truncated, or still going
    assert not envs.episode_success({}, 0.0, True)
    assert not envs.episode_success({"success": False}, 1.0, True)  # the env's own word wins
    env = envs.make(PLAIN_ID)
    solved = envs.run_episode(env, lambda obs: obs.split()[-1][::-1], seed=0)
    assert solved.success and solved.terminated and solved.num_turns == 1
    assert not envs.run_episode(env, lambda obs: "x", seed=0).success


def test_plain_env_passes_the_check_with_warnings():
    report = envs.check(PLAIN_ID, episodes=5)
    assert report.passed, report.format()
    warned = "\n".join(report.warnings)
    assert "info never gives success (read as terminated with a positive reward)" in warned
    assert "invalid_action (read as False)" in warned
    assert "not flagged info['invalid_action']=True" in warned
    assert report.results["expert"].startswith("skip: no expert_action()")  # not "ok": nothing was played
    shown = report.format()
    assert "PASS" in shown and "warning:" in shown and "  skip expert: no expert_action()" in shown


def test_plain_env_check_from_the_cli(capsys):
    assert main(["envs", "check", PLAIN_ID, "--episodes", "5"]) == 0
    assert "plain_text_env/Reverse-v0: PASS" in capsys.readouterr().out


class _RaisesOnText(plain_text_env.Reverse):
    def step(self, action):
        return super().step(int(action))  # ValueError on most text


class _DictObservation(plain_text_env.Reverse):
    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed)
        return {"text": obs}, info


class _Nondeterministic(plain_text_env.Reverse):
    calls = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        _Nondeterministic.calls += 1
        self.word = plain_text_env.WORDS[_Nondeterministic.calls % len(plain_text_env.WORDS)]  # ignores the seed
        return f"Reverse: {self.word}", {}


class _DefaultCharset(plain_text_env.Reverse):
    def __init__(self):
        super().__init__()
        self.observation_space = gym.spaces.Text(max_length=64)  # letters and digits: no ' ' or ':'


@pytest.fixture
def broken():
    added = []

    def register(cls):
        env_id = f"plain_text_env_test/{cls.__name__.strip('_')}-v0"
        gym.register(env_id, entry_point=cls, max_episode_steps=4)
        added.append(env_id)
        return env_id

    yield register
    for env_id in added:
        gym.registry.pop(env_id, None)


@pytest.mark.parametrize("cls, check, message", [
    (_RaisesOnText, "bad_actions", "step(empty) raised ValueError"),
    (_DictObservation, "text_spaces", "reset returned a dict observation; expected str"),
    (_Nondeterministic, "determinism", "two runs with the same seed and actions differ: messages[0]: {"),
    (_DefaultCharset, "text_spaces", "gymnasium's default Text charset is letters and digits only"),
])
def test_real_contract_breaks_still_fail(broken, cls, check, message):
    report = envs.check(broken(cls), episodes=3)
    assert not report.passed
    assert message in report.results[check], report.format()


def test_plain_env_trains_with_rl(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["rl", *RL_SMOKE, f"envs=[{PLAIN_ID}]", "run.name=plain"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"].endswith("step_2")
    rows = read_metrics(tmp_path / "runs" / "plain")
    assert [r["step"] for r in rows if "rollout/reward" in r] == [1, 2]
    key = "plain_text_env.Reverse-v0"  # metric names drop the module
    assert f"rollout/success/{key}" in rows[-1] and f"eval/success/{key}" in rows[-1]


def test_plain_env_trains_with_the_pipeline(tmp_path, monkeypatch, capsys):
    """A plain env has no heuristic or expert: the demonstrations come from gymnasium's random agent."""
    monkeypatch.chdir(tmp_path)
    toy = ["run.name=plain", f"envs=[{PLAIN_ID}]", "demos.teacher=random", "model.hidden_size=64",
           "demos.episodes_per_env=8", "sft.train.max_steps=2", "sft.train.warmup_steps=1",
           "sft.train.micro_batch_tokens=1024", "sft.eval.episodes_per_env=2", "rl.rollout.prompts_per_step=2",
           "rl.rollout.samples_per_prompt=2", "rl.rollout.pool.num_workers=0", "rl.train.steps=2",
           "rl.train.micro_batch_tokens=1024", "rl.eval.episodes_per_env=2", "rl.eval.at_start=false",
           "eval.episodes_per_env=3", "eval.temperatures=[0.0]", "logging.backends=[jsonl]", "logging.report=false",
           "run.quiet=true"]
    assert main(["pipeline", *toy]) == 0
    results = json.loads((tmp_path / "runs" / "plain" / "results.json").read_text())
    key = "plain_text_env.Reverse-v0"
    assert 0.0 <= results["results"]["rl"]["T=0"][f"eval/success/{key}"] <= 1.0
    assert key in results["baselines"]["random"] and "expert" not in results["baselines"]
    assert f"| {key} |" in capsys.readouterr().out


def test_every_env_a_check_makes_is_closed_passed_or_failed(monkeypatch):
    """An env may hold a server session, a subprocess or files: each check closes what it made, also when it fails."""
    from hybrid_rl.envs import checker

    made, closed = [], []
    real_make = checker.make

    def counting_make(*args, **kwargs):
        env = real_make(*args, **kwargs)
        made.append(env)
        real_close = env.close

        def close():
            closed.append(env)
            real_close()
        env.close = close
        return env

    monkeypatch.setattr(checker, "make", counting_make)
    report = envs.check(PLAIN_ID, episodes=3)
    assert report.passed and len(made) > 5
    assert all(env in closed for env in made), f"{sum(env not in closed for env in made)} of {len(made)} envs left open"
    made.clear(), closed.clear()
    failing = envs.check("hybrid_rl/FrozenLake-v1", episodes=3, max_episode_steps=1)  # the expert cannot reach the goal
    assert failing.results["expert"].startswith("CheckFailed") and all(env in closed for env in made)


def test_a_close_that_raises_does_not_hide_the_checks_own_failure(monkeypatch):
    from hybrid_rl.envs import checker

    real_make, made = checker.make, []

    def make_with_bad_close(*args, **kwargs):
        env = real_make(*args, **kwargs)
        made.append(env)
        if len(made) > 1:  # the first is check()'s own make-and-close, before the checks

            def close():
                raise RuntimeError("close exploded")
            env.close = close
        return env

    monkeypatch.setattr(checker, "make", make_with_bad_close)
    report = envs.check("hybrid_rl/FrozenLake-v1", episodes=3, max_episode_steps=1)  # the expert cannot reach the goal
    assert report.results["expert"].startswith("CheckFailed: expert success"), report.results["expert"]
    assert "close exploded" in report.results["text_spaces"]  # where the check passed, the failing close is the finding

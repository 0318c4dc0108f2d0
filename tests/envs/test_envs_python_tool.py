"""PythonTool-v0: seeded computation questions, the python tool in the sandbox, teachers, the checker, RL."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hybrid_rl import envs
from hybrid_rl.cli import main
from hybrid_rl.envs.python_tool import TASKS
from hybrid_rl.envs.sandbox import run_python
from hybrid_rl.metrics import read_metrics
from test_envs_plain import RL_SMOKE

ENV_ID = "hybrid_rl/PythonTool-v0"


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_program_prints_the_reference_answer(name):
    for seed in range(3):
        task = TASKS[name](np.random.default_rng(seed))
        assert task.estimate != task.answer or seed > 0 or name == "math_words"  # the heuristic is not the reference
        assert run_python(task.code).text() == str(task.answer), task.question


def test_math_words_is_the_generated_word_problems_as_one_expression():
    from hybrid_rl.envs.math_words import problem

    for seed in range(300):  # the expression against MathWords' own working, without the sandbox
        task = TASKS["math_words"](np.random.default_rng(seed))
        expression = task.code.removeprefix("print(").removesuffix(")")
        assert eval(expression, {"__builtins__": {}}) == task.answer, task.code  # noqa: S307 (our own digits and operators)
    p = problem(int(np.random.default_rng(0).integers(2**31)))
    assert TASKS["math_words"](np.random.default_rng(0)).question == p.question
    obs, _ = envs.make("hybrid_rl/PythonTool-v0(tasks=math_words)").reset(seed=3)
    assert obs.endswith("have now?")
    episode = envs.expert_episode("hybrid_rl/PythonTool-v0(tasks=math_words)", seed=3)
    assert episode.success and episode.num_turns == 2
    mixed = envs.make(ENV_ID, tasks="primes+math_words")
    assert mixed.unwrapped.task_names == ["primes", "math_words"]


def test_expert_episode_runs_code_then_answers():
    episode = envs.expert_episode(ENV_ID, seed=0)
    assert episode.success and episode.num_turns == 2
    tool_reply = episode.messages[3]
    assert tool_reply["role"] == "tool" and tool_reply["content"] == episode.messages[4]["content"]


def test_escape_attempts_are_tool_messages_and_the_episode_goes_on():
    env = envs.make(ENV_ID)
    env.reset(seed=1)
    for code, verdict in [("import os\nwhile True:\n    os.fork()", "blocked: starting processes"),
                          ("import socket\nsocket.create_connection(('127.0.0.1', 9))", "blocked: network access"),
                          ("while True:\n    pass", "killed: CPU time limit")]:
        obs, reward, terminated, _, info = env.step(envs.format_tool_call("python", {"code": code}))
        assert verdict in obs and info["role"] == "tool" and not terminated and not info["invalid_action"]
        assert info["reward_components"] == {"turn": -0.02, "sandbox": -0.05}
    obs, reward, terminated, _, info = env.step(env.unwrapped.expert_action())
    assert info["reward_components"] == {"turn": -0.02} and not terminated
    obs, reward, terminated, _, info = env.step(env.unwrapped.expert_action())
    assert obs == "correct" and terminated and info["success"]


@pytest.mark.parametrize("action, problem", [
    ('<tool_call>{"name": "shell", "arguments": {"code": "ls"}}</tool_call>', "the only tool is python"),
    ('<tool_call>{"name": "python", "arguments": {"source": "print(1)"}}</tool_call>', 'python needs "code"'),
    ("I am not sure", "no number"),
])
def test_unusable_actions_are_invalid(action, problem):
    env = envs.make(ENV_ID)
    env.reset(seed=0)
    obs, _, terminated, _, info = env.step(action)
    assert info["invalid_action"] and problem in obs and not terminated


def test_envs_check_passes():
    report = envs.check(ENV_ID, episodes=20)
    assert report.passed, report.format()
    assert report.expert["success_rate"] == 1.0


def test_the_heuristic_and_random_teachers_are_worse_than_the_expert():
    heuristic = envs.expert_stats(ENV_ID, 20, split="train", policy="heuristic")
    random = envs.expert_stats(ENV_ID, 20, split="train", policy="random")
    assert heuristic["success_rate"] <= 0.2 and random["success_rate"] <= 0.2
    assert envs.make(ENV_ID, tasks=["primes"]).reset(seed=0)[0].startswith("How many primes")
    with pytest.raises(ValueError, match="choose one or more of"):
        envs.make(ENV_ID, tasks=["chess"])


def test_rl_trains_through_the_sandbox(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["rl", *RL_SMOKE, f"envs=[{ENV_ID}]", "run.name=python_tool"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"].endswith("step_2")
    rows = read_metrics(tmp_path / "runs" / "python_tool")
    assert [r["step"] for r in rows if "rollout/reward" in r] == [1, 2]

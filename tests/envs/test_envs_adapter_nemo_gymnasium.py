"""NemoGymnasiumEnv against a NeMo-Gym GymnasiumServer-shaped server on loopback (tests/envs/nemo_gym_server.py):
/reset and /step in NeMo-Gym's shapes with the session cookie, the checker, RL steps; bad answers name what failed."""

from __future__ import annotations

import gymnasium as gym
import pytest

from hybrid_rl import envs
from hybrid_rl.cli import main
from hybrid_rl.envs.adapters import NemoGymError, NemoGymnasiumEnv
from hybrid_rl.metrics import read_metrics
from nemo_gym_server import ROWS, resource_server
from test_envs_plain import RL_SMOKE


def test_an_episode_of_a_gymnasium_server():
    with resource_server() as server:
        env = NemoGymnasiumEnv(server.url, ROWS)
        obs, info = env.reset(seed=0)
        secret = env.row["secret"]
        assert obs == "Spell the secret word.\nThe word has 3 letters." and info["role"] == "user"
        assert env.system_prompt == "Answer with the word."
        obs, reward, terminated, truncated, info = env.step("xyz")
        assert (obs, reward, terminated, truncated) == (f"no; it starts with {secret[0]}", 0.0, False, False)
        obs, reward, terminated, truncated, info = env.step(f" {secret} ")
        assert (obs, reward, terminated, info["success"]) == ("right", 1.0, True, True)
        sent = server.stepped[-1]  # the row and the model's message as Responses API output, in the session
        assert sent["secret"] == secret and sent["responses_create_params"] == ROWS[0 if secret == "cab" else 1]["responses_create_params"]
        assert [(m["type"], m["role"], m["content"][0]["text"]) for m in sent["response"]["output"]] == [
            ("message", "assistant", f" {secret} ")]
        assert sent["response"]["object"] == "response" and sent["response"]["id"] != server.stepped[-2]["response"]["id"]
        env.reset(seed=0)
        assert [env.step("no")[3] for _ in range(3)] == [False, False, True]  # the server's truncation


@pytest.mark.parametrize("mode, message", [
    ("step_bad_reward", "/step answered observation '?', reward 'high'"),
    ("step_not_json", "/step answered b'<html>oops</html>', which is not JSON"),
])
def test_bad_step_answers_name_what_failed(mode, message):
    with resource_server(mode) as server:
        env = NemoGymnasiumEnv(server.url, ROWS)
        env.reset(seed=0)
        with pytest.raises(NemoGymError, match=message.replace("(", r"\(").replace("?", r"\?")):
            env.step("cab")


def test_a_gymnasium_server_passes_the_check_and_trains_with_rl(tmp_path, monkeypatch, capsys):
    with resource_server() as server:
        gym.register("nemo_gymnasium_test/Secret-v0", entry_point="hybrid_rl.envs.adapters:NemoGymnasiumEnv",
                     kwargs={"url": server.url, "rows": ROWS}, max_episode_steps=3)  # the server truncates at 3
        try:
            report = envs.check("nemo_gymnasium_test/Secret-v0", episodes=3)
            assert report.passed, report.format()
            monkeypatch.chdir(tmp_path)
            assert main(["rl", *RL_SMOKE, "envs=[nemo_gymnasium_test/Secret-v0]", "run.name=gs"]) == 0
            rows = read_metrics(tmp_path / "runs" / "gs")
            assert [r["step"] for r in rows if "rollout/reward" in r] == [1, 2]
            assert all(r["rollout/env_errors"] == 0.0 for r in rows if "rollout/env_errors" in r)
        finally:
            gym.registry.pop("nemo_gymnasium_test/Secret-v0", None)

"""NemoGymEnv against a small resource server on loopback (tests/envs/nemo_gym_server.py): an episode in
NeMo-Gym's shapes, tool-call mistakes as invalid actions, the checker, 2 RL steps; a server that is down,
fails, answers garbage or hangs is a NemoGymError in the env and an env_error episode in the engine."""

from __future__ import annotations

import json

import gymnasium as gym
import pytest

from hybrid_rl import envs
from hybrid_rl.cli import main
from hybrid_rl.envs.adapters import NemoGymEnv, NemoGymError
from hybrid_rl.envs.adapters.nemo_gym import verified_reward
from hybrid_rl.metrics import read_metrics
from nemo_gym_server import ROWS, resource_server
from test_envs_plain import RL_SMOKE


def call(name, **arguments):
    return envs.format_tool_call(name, arguments)


@pytest.fixture
def registered():
    added = []

    def register(url, **kwargs):
        env_id = f"nemo_gym_test/Secret{len(added)}-v0"
        gym.register(env_id, entry_point="hybrid_rl.envs.adapters:NemoGymEnv",
                     kwargs={"url": url, "rows": ROWS, **kwargs}, max_episode_steps=6)
        added.append(env_id)
        return env_id

    yield register
    for env_id in added:
        gym.registry.pop(env_id, None)


def test_an_episode_in_nemo_gyms_shapes():
    with resource_server() as server:
        env = NemoGymEnv(server.url, ROWS)
        obs, info = env.reset(seed=0)
        secret = env.row["secret"]
        assert obs == "Spell the secret word." and info["role"] == "user"
        assert env.system_prompt.startswith("Answer with the word.\nTools:\n- get_letter(index: integer)")
        letters = [env.step(call("get_letter", index=i)) for i in range(3)]
        assert [json.loads(o)["letter"] for o, *_ in letters] == list(secret)  # the session cookie came back
        assert all(step[4]["role"] == "tool" and not step[4]["invalid_action"] for step in letters)
        obs, reward, terminated, _, info = env.step(secret)
        assert (reward, terminated, info["success"]) == (1.0, True, True)
        output = server.verified[-1]["response"]["output"]
        assert [item["type"] for item in output] == ["function_call", "function_call_output"] * 3 + ["message"]
        assert output[0]["name"] == "get_letter" and json.loads(output[0]["arguments"]) == {"index": 0}
        assert output[-1]["content"][0]["text"] == secret and server.verified[-1]["secret"] == secret
        env.reset(seed=0)
        assert env.step("cat")[1:3] == (0.0, True)


@pytest.mark.parametrize("action, message", [
    (call("get_word"), "unknown tool 'get_word'; available tools: get_letter"),
    (call("get_letter", index=9), "get_letter refused the call (HTTP 422)"),
    (call("get_letter"), "index: an integer in [0, 3) is required"),
    ('<tool_call>{"name": "get_letter"', "is not closed by </tool_call>"),
])
def test_tool_call_mistakes_are_invalid_and_say_why(action, message):
    with resource_server() as server:
        env = NemoGymEnv(server.url, ROWS)
        env.reset(seed=0)
        obs, reward, terminated, _, info = env.step(action)
        assert message in obs and info["invalid_action"] and not terminated and reward == 0.0


def test_the_adapter_passes_the_check(registered):
    with resource_server() as server:
        report = envs.check(registered(server.url), episodes=3)
        assert report.passed, report.format()


@pytest.mark.parametrize("mode, message", [
    ("verify_500", "answered HTTP 500: {\"detail\": \"judge crashed\"}; the resource server failed, see its log"),
    ("verify_not_json", "answered b'<html>oops</html>', which is not JSON"),
    ("verify_no_reward", "expected a JSON object with 'reward' (a number) or 'reward_components'"),
    ("verify_hangs", "timed out (timeout 0.2 s); is the resource server running at"),
])
def test_server_failures_raise_naming_what_failed(mode, message):
    with resource_server(mode) as server:
        env = NemoGymEnv(server.url, ROWS, timeout_s=0.2)
        env.reset(seed=0)
        with pytest.raises(NemoGymError) as err:
            env.step("cab")
        assert message in str(err.value)


def test_a_server_that_is_down_is_named_with_the_fix():
    with resource_server() as server:
        url = server.url  # the port is free again once the server is gone
    with pytest.raises(NemoGymError, match=rf"POST {url}/seed_session failed: .*is the resource server running at {url}\? "
                                           r"Start it, or fix NemoGymEnv url"):
        NemoGymEnv(url, ROWS).reset(seed=0)


def test_failures_are_env_error_episodes_in_the_engine_not_crashes(registered):
    import torch

    from hybrid_rl.model import HybridLM
    from hybrid_rl.model.config import HybridConfig
    from hybrid_rl.model.tokenizer import ByteTokenizer
    from hybrid_rl.rollout.config import EpisodeConfig
    from hybrid_rl.rollout.evaluate import evaluate

    torch.manual_seed(0)
    model = HybridLM(HybridConfig.from_preset("micro", hidden_size=64)).eval()
    episode = EpisodeConfig(max_turn_tokens=3, max_episode_tokens=256)
    with resource_server("verify_500") as server:
        failing = registered(server.url)
        result = evaluate(model, ByteTokenizer(), [failing], seeds=[0, 1], episode=episode)
        down_url = server.url
    down = registered(down_url)
    result_down = evaluate(model, ByteTokenizer(), [down], seeds=[0], episode=episode)
    statuses = [t.status for t in result.trajectories + result_down.trajectories]
    assert statuses == ["env_error"] * 3
    assert all("HTTP 500" in t.error for t in result.trajectories if t.num_turns)
    assert "env.reset at turn 0" in result_down.trajectories[0].error and "seed_session" in result_down.trajectories[0].error


def test_verified_reward_takes_reward_or_the_sum_of_its_components():
    assert verified_reward({"reward": 0.5}) == (0.5, {"reward": 0.5})
    assert verified_reward({"reward_components": {"format": 0.2, "answer": 1.0}}) == (1.2, {"format": 0.2, "answer": 1.0})
    reward, parts = verified_reward({"reward": 1.0, "reward_components": {"answer": 0.75}})
    assert reward == 1.0 and parts == {"answer": 0.75, "rest": 0.25}
    with pytest.raises(NemoGymError, match="expected numbers"):
        verified_reward({"reward": "high"})
    for answer in ({"reward": float("nan")}, {"reward": "inf"}, {"reward_components": {"answer": float("-inf")}}):
        with pytest.raises(NemoGymError, match="expected finite numbers"):
            verified_reward(answer)


@pytest.mark.parametrize("kwargs, message", [
    ({"url": "127.0.0.1:8000", "rows": ROWS}, "give the resource server's base URL, e.g. 'http://127.0.0.1:8000'"),
    ({"url": "http://127.0.0.1:1", "rows": [{"secret": "x"}]}, "rows [0] have no responses_create_params.input"),
    ({"url": "http://127.0.0.1:1", "rows": []}, "no rows; each row is a NeMo-Gym task"),
])
def test_bad_adapter_input_names_the_problem_and_the_fix(kwargs, message):
    with pytest.raises(ValueError) as err:
        NemoGymEnv(**kwargs)
    assert message in str(err.value)


def test_trains_with_rl_against_the_server(registered, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with resource_server() as server:
        env_id = registered(server.url)
        assert main(["rl", *RL_SMOKE, f"envs=[{env_id}]", "run.name=nemo"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"].endswith("step_2")
    rows = read_metrics(tmp_path / "runs" / "nemo")
    assert [r["step"] for r in rows if "rollout/reward" in r] == [1, 2]
    assert len(server.verified) >= 8  # every episode that ended by an answer was verified

"""Model output never crashes an environment: every env x every kind of bad action."""

import pytest

from hybrid_rl import envs
from hybrid_rl.envs.checker import BAD_ACTIONS

# An action each env can parse but must refuse by its rules, and the words its explanation contains.
INVALID_MOVES = {
    "hybrid_rl/Buttons-v0": ("-3", "no key"),
    "hybrid_rl/Nim-v0": ("4", "take 1, 2 or 3"),
    "hybrid_rl/Snake-v0": ("jump", "left, down, right, up"),
    "hybrid_rl/GuessNumber-v0": ("99", "out of range"),
    "hybrid_rl/FrozenLake-v1": ("jump", "left down right up"),
    "hybrid_rl/Taxi-v3": ("fly", "pickup"),
    "hybrid_rl/CliffWalking-v1": ("north", "up right down left"),
    "hybrid_rl/Blackjack-v1": ("double", "hit or stick"),
    "hybrid_rl/Calculator-v0": ("the answer", "no number"),
    "hybrid_rl/Arithmetic-v0": ("twelve", "no number"),
    "hybrid_rl/Mastermind-v0": ("ABCDEZ", "not a code"),
    "hybrid_rl/MathWords-v0": ("twelve", "end with 'Answer: <value>'"),
    "hybrid_rl/Dataset-v0": ("twelve", "end with 'Answer: <value>'"),
    "hybrid_rl/PythonTool-v0": ("the answer", "no number"),
}


@pytest.mark.parametrize("kind", list(BAD_ACTIONS))
def test_bad_action_gets_an_observation_and_the_episode_follows_the_rules(env_id, kind):
    env = envs.make(env_id)
    env.reset(seed=3)
    obs, reward, terminated, truncated, info = env.step(BAD_ACTIONS[kind])
    assert isinstance(obs, str) and obs.strip() and obs in env.observation_space
    if kind in ("empty", "whitespace", "garbage", "100kb", "100kb_digits", "not_a_string"):
        assert info["invalid_action"] is True and obs.startswith("Invalid:")
        assert info["success"] is False and reward < 0.01
        single_turn = env.spec.max_episode_steps == 1
        assert terminated == single_turn  # a multi-turn episode goes on; a one-turn answer is over
        if not single_turn:
            obs2, _, _, _, info2 = env.step(env.unwrapped.expert_action())  # ...and still plays normally
            assert not info2["invalid_action"] and not obs2.startswith("Invalid:"), obs2


def test_invalid_move_is_explained(env_id):
    action, explanation = INVALID_MOVES[env_id]
    env = envs.make(env_id)
    env.reset(seed=0)
    obs, _, _, _, info = env.step(action)
    assert info["invalid_action"] is True and explanation in obs, obs


def test_100kb_action_is_refused_with_its_length(env_id):
    env = envs.make(env_id)
    env.reset(seed=0)
    obs, *_ = env.step("1" * 100_000)
    assert "100000 characters" in obs and len(obs) < 200


def test_malformed_tool_call_is_fed_back_to_the_model():
    env = envs.make("Calculator-v0")
    env.reset(seed=0)
    obs, _, terminated, _, info = env.step('<tool_call>{"name": "calc", "arguments": {"expression": </tool_call>')
    assert info["invalid_action"] and "not valid JSON" in obs and '"expression": "3*4"' in obs and not terminated
    obs, _, _, _, info = env.step('<tool_call>{"name": "calc", "arguments": {"expression": "1/0"}}</tool_call>')
    assert info["role"] == "tool" and "division by zero" in obs and not info["invalid_action"]
    obs, *_ = env.step('<tool_call>{"name": "search", "arguments": {}}</tool_call>')
    assert "unknown tool 'search'" in obs and "calc" in obs
    obs, *_ = env.step('<tool_call>{"name": "calc", "arguments": {"expr": "1"}}</tool_call>')
    assert "bad arguments for calc" in obs

"""Buttons-v0: reach a target number with +a / *b keys. Rules, teachers and bad actions."""

from collections import deque

import pytest

from hybrid_rl import envs
from hybrid_rl.envs.buttons import presses_to
from hybrid_rl.envs.checker import BAD_ACTIONS, MUST_BE_INVALID
from hybrid_rl.envs.episode import expert_policy

ENV_ID = "hybrid_rl/Buttons-v0"


def _bfs_presses(start, add, mul, target):
    """Naive twin of the expert: the fewest presses from start to target (None if unreachable)."""
    dist, queue = {start: 0}, deque([start])
    while queue:
        x = queue.popleft()
        if x == target:
            return dist[x]
        for y in (x + add, x * mul):
            if y <= target and y not in dist:
                dist[y] = dist[x] + 1
                queue.append(y)
    return None


def _set(env, start, add, mul, target):
    """Reset, then put a chosen puzzle in place (the distance table follows)."""
    env.reset(seed=0)
    game = env.unwrapped
    game.start, game.add, game.mul, game.target, game.value = start, add, mul, target, start
    game.dist = presses_to(target, add, mul)
    return game


def test_buttons_passes_the_check_and_is_listed(check_and_list):
    row = check_and_list(ENV_ID)
    assert row.split()[1] == "16" and "+a and *b" in row


def test_buttons_rules_rewards_and_the_end_of_an_episode():
    env = envs.make("Buttons-v0")
    game = _set(env, start=1, add=3, mul=2, target=11)
    obs, reward, terminated, _, info = env.step("+3")
    assert obs == "now 4" and not terminated and info["reward_components"] == {"turn": -0.02}
    assert reward == pytest.approx(-0.02) and not info["success"] and not info["invalid_action"]
    obs, *_ = env.step("*2")
    assert obs == "now 8" and game.value == 8
    obs, reward, terminated, _, info = env.step("+3")
    assert obs == "11 reached" and terminated and info["success"]
    assert info["reward_components"] == {"success": 1.0, "turn": -0.02} and reward == pytest.approx(0.98)
    assert reward == pytest.approx(sum(info["reward_components"].values()))

    _set(env, start=1, add=3, mul=2, target=11)
    env.step("*2"), env.step("*2"), env.step("*2")  # 2, 4, 8
    obs, reward, terminated, _, info = env.step("*2")  # 16: past the target, the episode is lost
    assert obs == "16 is past 11, lost" and terminated and not info["success"] and reward == pytest.approx(-0.02)


def test_buttons_puzzles_are_new_per_seed_and_deterministic():
    env = envs.make("Buttons-v0")
    seen = set()
    for seed in envs.seeds(ENV_ID, "train", 50):
        first, _ = env.reset(seed=seed)
        assert env.reset(seed=seed)[0] == first
        game = env.unwrapped
        assert first == f"Reach {game.target} from {game.start}. Keys: +{game.add} *{game.mul}"
        assert 1 <= game.start <= 9 and 2 <= game.add <= 9 and game.mul in (2, 3) and game.target <= 99
        assert 3 <= _bfs_presses(game.start, game.add, game.mul, game.target) <= 8
        seen.add(first)
    assert len(seen) >= 45


def test_buttons_expert_solves_every_train_seed_in_the_fewest_presses():
    env = envs.make("Buttons-v0")
    act = expert_policy(env)
    for seed in envs.seeds(ENV_ID, "train", 100):
        episode = envs.run_episode(env, act, seed=seed)
        game = env.unwrapped
        assert episode.success and episode.terminated, episode.transcript()
        assert episode.num_turns == _bfs_presses(game.start, game.add, game.mul, game.target)
    assert envs.expert_stats(ENV_ID, 100, split="train")["success_rate"] == 1.0


def test_buttons_heuristic_is_worse_than_the_expert_but_far_from_hopeless():
    expert = envs.expert_stats(ENV_ID, 100, split="train", policy="expert")
    heuristic = envs.expert_stats(ENV_ID, 100, split="train", policy="heuristic")
    rand = envs.expert_stats(ENV_ID, 100, split="train", policy="random")
    assert expert["success_rate"] == 1.0
    assert 0.2 < heuristic["success_rate"] < expert["success_rate"]
    assert heuristic["mean_turns"] > expert["mean_turns"] and heuristic["mean_return"] < expert["mean_return"]
    assert rand["success_rate"] < heuristic["success_rate"]


def test_buttons_heuristic_is_deterministic_and_plays_only_legal_keys():
    env = envs.make("Buttons-v0")
    act = expert_policy(env, policy="heuristic")
    for seed in envs.seeds(ENV_ID, "train", 50):
        for noise in (None, 0.3):
            a = envs.expert_episode(ENV_ID, seed, noise=noise, policy="heuristic")
            b = envs.expert_episode(ENV_ID, seed, noise=noise, policy="heuristic")
            assert a.messages == b.messages and a.rewards == b.rewards
        episode = envs.run_episode(env, act, seed=seed)
        assert not any(info["invalid_action"] for info in episode.infos), episode.transcript()
        # it fails only by the typical trap (passing the target) or by running out of turns
        assert episode.success or episode.truncated or episode.messages[-1]["content"].endswith("lost")


def test_buttons_heuristic_multiplies_first_and_falls_into_the_gap():
    env = envs.make("Buttons-v0")
    game = _set(env, start=1, add=3, mul=2, target=10)
    keys = []
    while True:
        key = game.heuristic_action()
        keys.append(key)
        obs, _, terminated, truncated, _ = env.step(key)
        if terminated or truncated:
            break
    assert keys == ["*2", "*2", "*2", "+3"] and obs == "11 is past 10, lost"  # 2, 4, 8, then 8+3 > 10
    game = _set(env, start=1, add=3, mul=2, target=10)
    keys, terminated = [], False
    while not terminated:
        keys.append(game.expert_action())
        _, _, terminated, _, _ = env.step(keys[-1])
    assert keys == ["+3", "+3", "+3"] and game.value == 10  # 4, 7, 10 ("+" first among shortest paths)


@pytest.mark.parametrize("kind", list(BAD_ACTIONS))
def test_buttons_bad_actions_are_invalid_observations_not_exceptions(kind):
    env = envs.make("Buttons-v0")
    env.reset(seed=3)
    value = env.unwrapped.value
    obs, reward, terminated, truncated, info = env.step(BAD_ACTIONS[kind])
    assert isinstance(obs, str) and obs in env.observation_space
    assert info["invalid_action"] and obs.startswith("Invalid:") and not terminated and reward < 0
    assert env.unwrapped.value == value  # nothing was pressed
    if kind in MUST_BE_INVALID:
        assert reward == pytest.approx(sum(info["reward_components"].values()))


def test_buttons_wrong_keys_are_explained_and_lenient_text_is_accepted():
    env = envs.make("Buttons-v0")
    game = _set(env, start=1, add=3, mul=2, target=11)
    for text in ("-3", "+5", "*3", "press a key", "3", "+-3"):
        obs, _, terminated, _, info = env.step(text)
        assert info["invalid_action"] and "press +3 or *2" in obs and not terminated, (text, obs)
        assert game.value == 1
    for text, value in (("press +3", 4), (" * 2", 8), ("+", 11)):
        obs, _, _, _, info = env.step(text)
        assert not info["invalid_action"] and game.value == value, (text, obs)


def test_buttons_observations_are_short():
    for policy in ("expert", "heuristic", "random"):
        for seed in envs.seeds(ENV_ID, "train", 100):
            episode = envs.expert_episode(ENV_ID, seed, policy=policy)
            for message in episode.messages:
                if message["role"] == "assistant":
                    assert len(message["content"]) <= 5  # a byte-level model writes <= 5 bytes + <|end|>
                else:
                    assert len(message["content"]) < 60, message
    env = envs.make("Buttons-v0")
    env.reset(seed=0)
    assert len(env.step("a very long and wrong answer to the puzzle")[0]) < 60

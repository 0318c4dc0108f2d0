"""The built-in environments' rules, renderings and experts, against naive references."""

import itertools
from collections import deque

import numpy as np
import pytest

from hybrid_rl import envs
from hybrid_rl.envs.mastermind import feedback_table, score
from hybrid_rl.envs.toy_text import basic_strategy_hits


def test_guess_number_feedback_rewards_and_success():
    env = envs.make("GuessNumber-v0")
    obs, info = env.reset(seed=5)
    assert obs == "Guess a number between 1 and 16." and info == {"role": "user", "state": "1-16"}
    target = env.unwrapped.target
    low, high = (target - 1, target + 1)
    if low >= 1:
        assert env.step(f" {low} ")[0] == "higher"
    if high <= 16:
        assert env.step(f"I guess {high}.")[0] == "lower"
    obs, reward, terminated, _, info = env.step(str(target))
    assert obs == "correct" and terminated and info["success"]
    assert info["reward_components"] == {"success": 1.0, "turn": -0.02} and reward == pytest.approx(0.98)


def test_guess_number_range_is_configurable_and_binary_search_is_the_expert():
    for seed in range(30):
        episode = envs.expert_episode("GuessNumber-v0", seed, n=100, max_episode_steps=7)
        assert episode.success and episode.num_turns <= 7  # ceil(log2(101))
    assert envs.make("GuessNumber-v0", n=100).reset(seed=0)[0] == "Guess a number between 1 and 100."


def _bfs_length(desc):
    size = len(desc)
    start = next((r, c) for r in range(size) for c in range(size) if desc[r][c] == "S")
    dist, queue = {start: 0}, deque([start])
    while queue:
        r, c = queue.popleft()
        if desc[r][c] == "G":
            return dist[(r, c)]
        for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0)):
            nr, nc = r + dr, c + dc
            if 0 <= nr < size and 0 <= nc < size and desc[nr][nc] != "H" and (nr, nc) not in dist:
                dist[(nr, nc)] = dist[(r, c)] + 1
                queue.append((nr, nc))
    return None


@pytest.mark.parametrize("size", [4, 6])
def test_frozen_lake_maps_are_per_seed_solvable_and_the_expert_takes_the_shortest_path(size):
    limit = 4 * size * size
    maps = set()
    for seed in envs.seeds("FrozenLake-v1", "eval", 25):
        episode = envs.expert_episode("FrozenLake-v1", seed, size=size, max_episode_steps=limit)
        desc = envs.make("FrozenLake-v1", size=size).unwrapped
        desc.reset(seed=seed)
        maps.add(tuple(desc.desc))
        assert episode.success and episode.num_turns == _bfs_length(desc.desc)  # naive twin: BFS on the map
        assert len(episode.messages[0]["content"].splitlines()) == size + 1
    assert len(maps) > 15  # a new map for (almost) every seed


def test_frozen_lake_renders_the_player_and_is_not_slippery_by_default():
    env = envs.make("FrozenLake-v1")
    obs, _ = env.reset(seed=0)
    assert obs.splitlines()[0] == "Reach G, avoid H. Moves: left down right up."
    assert obs.splitlines()[1][0] == "P" and not env.unwrapped.is_slippery
    move = env.unwrapped.expert_action()
    obs, *_ = env.step(f"I go {move}")
    assert "P" in obs and obs.splitlines()[0][0] == "S"


def test_taxi_rendering_and_illegal_pickup():
    env = envs.make("Taxi-v3")
    for seed in range(50):  # a start where the taxi is away from the waiting passenger
        obs, _ = env.reset(seed=seed)
        row, col, passenger, _ = env.unwrapped.inner.decode(env.unwrapped.state)
        if passenger < 4 and (row, col) != env.unwrapped.inner.locs[passenger]:
            break
    line = obs.splitlines()[1]
    assert line == f"taxi={row},{col} passenger=%d,%d dest=%d,%d" % (
        *env.unwrapped.inner.locs[passenger], *env.unwrapped.inner.locs[env.unwrapped.inner.decode(env.unwrapped.state)[3]])
    obs, reward, _, _, info = env.step("pickup")
    assert obs == f"{line} illegal pickup" and info["reward_components"]["illegal"] < 0


def test_cliff_walking_fall_sends_you_back():
    env = envs.make("CliffWalking-v1")
    obs, _ = env.reset(seed=0)
    assert obs.endswith("at 3,0")
    obs, _, terminated, _, info = env.step("right")
    assert obs == "You fell off the cliff, back at 3,0" and not terminated and info["reward_components"]["cliff"] < 0


def test_blackjack_basic_strategy_and_outcomes():
    assert basic_strategy_hits(11, 10, 0) and not basic_strategy_hits(17, 1, 0)
    assert basic_strategy_hits(16, 10, 0) and not basic_strategy_hits(16, 6, 0)
    assert basic_strategy_hits(18, 10, 1) and not basic_strategy_hits(18, 7, 1)
    returns = [envs.expert_episode("Blackjack-v1", s).episode_return for s in range(200)]
    random_returns = [envs.expert_episode("Blackjack-v1", s, noise=1.0).episode_return for s in range(200)]
    assert np.mean(returns) > np.mean(random_returns)  # the expert is better than chance
    assert set(returns) <= {-1.0, 0.0, 1.0}


def test_blackjack_reports_the_dealer_total_with_an_ace_counted_as_eleven():
    """Seed 2: the dealer holds 10 and an ace, 21 (not 11); the text the model reads says so."""
    env = envs.make("Blackjack-v1")
    env.reset(seed=2)
    obs, reward, terminated, _, _ = env.step("stick")
    assert sorted(env.unwrapped.inner.dealer) == [1, 10]
    assert terminated and "dealer has 21" in obs and reward < 0


def test_calculator_expert_uses_one_tool_call_per_operation():
    episode = envs.expert_episode("Calculator-v0", 0)
    roles = [m["role"] for m in episode.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant", "user"]
    assert episode.messages[2]["content"].startswith("<tool_call>") and episode.success
    assert episode.messages[-2]["content"] == episode.messages[-3]["content"]  # answers the last tool result
    env = envs.make("Calculator-v0", operations=3)
    env.reset(seed=1)
    assert env.unwrapped.last_observation.count("(") == 2


def test_calculator_wrong_answer_ends_the_episode():
    env = envs.make("Calculator-v0")
    env.reset(seed=0)
    obs, reward, terminated, _, info = env.step(str(env.unwrapped.answer + 1))
    assert terminated and not info["success"] and obs.startswith("wrong, the answer is")


def test_arithmetic_is_one_turn():
    env = envs.make("Arithmetic-v0")
    obs, _ = env.reset(seed=0)
    a, b = (int(x) for x in obs.rstrip("=").split("+"))
    out = env.step(f"{a + b}")
    assert out[0] == "correct" and out[1] == 1.0 and out[2]
    env.reset(seed=0)
    assert env.step(f"{a + b + 1}")[1] == 0.0


def test_mastermind_feedback_table_matches_the_naive_score():
    letters, pegs = "ABCD", 3
    codes = ["".join(c) for c in itertools.product(letters, repeat=pegs)]
    table = feedback_table(letters, pegs)
    for i, secret in enumerate(codes):
        for j, guess in enumerate(codes):
            exact, near = score(secret, guess)
            assert table[i, j] == exact * (pegs + 1) + near
    assert score("AAB", "ABA") == (1, 2) and score("ABC", "DDD") == (0, 0)


def test_mastermind_parsing_and_expert_bound():
    env = envs.make("Mastermind-v0")
    env.reset(seed=0)
    for text in ("ABD", "abd", "A B D", "guess: ABD", "A,B,D"):
        assert env.unwrapped.parse_guess(text) == "ABD"
    turns = [envs.expert_episode("Mastermind-v0", s).num_turns for s in envs.seeds("Mastermind-v0", "eval", 64)]
    assert max(turns) <= 5


def test_expert_noise_is_reproducible_and_weaker():
    a = envs.expert_episode("GuessNumber-v0", 3, noise=0.5)
    b = envs.expert_episode("GuessNumber-v0", 3, noise=0.5)
    assert a.messages == b.messages
    noisy = envs.expert_stats("Mastermind-v0", 100, noise=0.7)
    clean = envs.expert_stats("Mastermind-v0", 100)
    assert noisy["mean_turns"] > clean["mean_turns"]
    env_default = envs.expert_stats("GuessNumber-v0", 50, expert_noise=1.0)  # the knob as an env kwarg
    assert env_default["mean_turns"] > envs.expert_stats("GuessNumber-v0", 50)["mean_turns"]


def test_expert_is_consistent_mid_episode_after_model_moves(env_id):
    """The expert solves from wherever a (bad) model left the episode: usable for corrections."""
    env = envs.make(env_id)
    if env.spec.max_episode_steps == 1 or not env.unwrapped.solvable:
        pytest.skip(f"{env_id}: one turn, or not always solvable: there is no 'mid-episode' to recover from")
    successes = 0
    for seed in range(20):
        obs, _ = env.reset(seed=seed)
        env.step("nonsense")
        while True:
            obs, _, terminated, truncated, info = env.step(env.unwrapped.expert_action())
            if terminated or truncated:
                successes += info["success"]
                break
    assert successes == 20


def test_guess_number_names_its_state_the_interval_left():
    env = envs.make("GuessNumber-v0", n=100)
    assert env.reset(seed=0)[1]["state"] == "1-100"
    target = env.unwrapped.target
    low, high = 1, 100
    for guess in (50, 25, 75):
        if guess == target:
            continue
        info = env.step(str(guess))[4]
        low, high = (max(low, guess + 1), high) if guess < target else (low, min(high, guess - 1))
        assert info["state"] == f"{low}-{high}"
    assert "state" not in envs.make("FrozenLake-v1").reset(seed=0)[1]  # its observation is its state

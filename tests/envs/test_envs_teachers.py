"""Teachers for SFT: the expert, a systematically worse heuristic, and random, on the real environments."""

import gymnasium as gym
import pytest

from hybrid_rl import envs
from hybrid_rl.envs.episode import expert_policy

# (env_id, kwargs): the environments with a heuristic; GuessNumber at the headline n=100 and the default n=16
HEURISTIC_ENVS = [("FrozenLake-v1", {}), ("Taxi-v3", {}), ("GuessNumber-v0", {"n": 100}), ("GuessNumber-v0", {})]
IDS = ["FrozenLake", "Taxi", "GuessNumber-n100", "GuessNumber-n16"]


@pytest.mark.parametrize(("env_id", "kwargs"), HEURISTIC_ENVS, ids=IDS)
def test_heuristic_is_deterministic_per_seed(env_id, kwargs):
    for seed in envs.seeds(env_id, "train", 10):
        for noise in (None, 0.3):
            a = envs.expert_episode(env_id, seed, noise=noise, policy="heuristic", **kwargs)
            b = envs.expert_episode(env_id, seed, noise=noise, policy="heuristic", **kwargs)
            assert a.messages == b.messages and a.rewards == b.rewards


@pytest.mark.parametrize(("env_id", "kwargs"), HEURISTIC_ENVS, ids=IDS)
def test_heuristic_plays_only_legal_moves(env_id, kwargs):
    env = envs.make(env_id, **kwargs)
    act = expert_policy(env, policy="heuristic")
    for seed in envs.seeds(env_id, "train", 50):
        episode = envs.run_episode(env, act, seed=seed)
        assert not any(info["invalid_action"] for info in episode.infos), episode.transcript()
        # no illegal pickup/dropoff in Taxi; never into a hole on FrozenLake (it loops instead)
        assert not any("illegal" in info["reward_components"] for info in episode.infos), episode.transcript()
        assert "fell into a hole" not in episode.transcript()
        assert episode.success or episode.truncated  # a failure is running out of turns, never a loss


@pytest.mark.parametrize(("env_id", "kwargs"), HEURISTIC_ENVS, ids=IDS)
def test_heuristic_is_worse_than_the_expert_but_far_from_hopeless(env_id, kwargs):
    expert = envs.expert_stats(env_id, 100, split="train", policy="expert", **kwargs)
    heuristic = envs.expert_stats(env_id, 100, split="train", policy="heuristic", **kwargs)
    rand = envs.expert_stats(env_id, 100, split="train", policy="random", **kwargs)
    assert expert["success_rate"] == 1.0
    assert 0.2 < heuristic["success_rate"] < expert["success_rate"]
    assert heuristic["mean_turns"] > expert["mean_turns"] and heuristic["mean_return"] < expert["mean_return"]
    assert rand["success_rate"] < heuristic["success_rate"]


def test_frozen_lake_heuristic_heads_for_the_goal_and_avoids_adjacent_holes():
    env = envs.make("FrozenLake-v1")
    env.reset(seed=0)
    lake = env.unwrapped
    lake.desc = ["SFFF", "FFHF", "FHFF", "FFFG"]
    for state, move in [(0, "down"),   # down and right both get closer: down first
                        (2, "right"),  # a hole below: right
                        (5, "left"),   # holes below and right: no closer move is safe -> the first safe move
                        (3, "down"),   # on the last column only down gets closer
                        (12, "right")]:  # on the last row only right does
        lake.state = state
        assert lake.heuristic_action() == move, (state, move)
    lake.desc = ["SFFF", "FFFF", "FFFF", "FFHG"]
    lake.state = 13  # last row, G two to the right behind a hole: it steps back and forth
    assert lake.heuristic_action() == "left"
    lake.state = 12
    assert lake.heuristic_action() == "right"


def test_guess_number_heuristic_is_coarse_then_linear():
    env = envs.make("GuessNumber-v0", n=100)
    env.reset(seed=0)
    env.unwrapped.target = 37
    guesses = []
    while True:
        guess = env.unwrapped.heuristic_action()
        guesses.append(int(guess))
        _, _, terminated, truncated, _ = env.step(guess)
        if terminated or truncated:
            break
    assert guesses == [10, 20, 30, 40, 39, 38, 37] and terminated
    env = envs.make("GuessNumber-v0")  # n=16: the coarse step is capped at n
    env.reset(seed=0)
    env.unwrapped.target = 16
    assert env.unwrapped.heuristic_action() == "10"
    env.step("10")
    assert env.unwrapped.heuristic_action() == "16"


def test_taxi_heuristic_never_drives_into_a_wall():
    env = envs.make("Taxi-v3")
    for seed in envs.seeds("Taxi-v3", "train", 30):
        env.reset(seed=seed)
        taxi = env.unwrapped
        for _ in range(40):
            before, move = taxi.state, taxi.heuristic_action()
            _, _, terminated, truncated, _ = env.step(move)
            assert move in ("pickup", "dropoff") or taxi.state != before, (seed, move)
            if terminated or truncated:
                break


def test_heuristic_noise_is_reproducible_and_changes_the_play():
    noisy = [envs.expert_episode("FrozenLake-v1", s, noise=0.5, policy="heuristic") for s in range(20)]
    clean = [envs.expert_episode("FrozenLake-v1", s, policy="heuristic") for s in range(20)]
    assert [e.messages for e in noisy] == [envs.expert_episode("FrozenLake-v1", s, noise=0.5, policy="heuristic").messages
                                           for s in range(20)]
    assert any(a.messages != b.messages for a, b in zip(noisy, clean))


def test_random_policy_is_reproducible_legal_and_weak():
    for env_id, kwargs in HEURISTIC_ENVS + [("Mastermind-v0", {})]:
        a = envs.expert_episode(env_id, 3, policy="random", **kwargs)
        assert a.messages == envs.expert_episode(env_id, 3, policy="random", **kwargs).messages
        assert not any(info["invalid_action"] for info in a.infos)
    # GuessNumber's random guess is any number in [1, n]; the expert's noise guesses inside the consistent
    # interval, a randomized binary search that is far stronger than random
    assert envs.expert_stats("GuessNumber-v0", 50, policy="random", n=100)["success_rate"] < 0.2
    assert envs.expert_stats("GuessNumber-v0", 50, noise=1.0, n=100)["success_rate"] > 0.5
    assert envs.expert_stats("FrozenLake-v1", 50, policy="random")["success_rate"] < 0.2


def test_unknown_policy_is_a_value_error_naming_the_valid_ones():
    env = envs.make("GuessNumber-v0")
    for call in (lambda: envs.expert_episode("GuessNumber-v0", 0, policy="greedy"),
                 lambda: envs.expert_stats("GuessNumber-v0", 5, policy="greedy"),
                 lambda: expert_policy(env, policy="greedy")):
        with pytest.raises(ValueError, match="'expert', 'heuristic', 'random'"):
            call()
    assert envs.POLICIES == ("expert", "heuristic", "random")


class ExpertOnly(envs.TextEnv):
    """Say 1: an env with an expert and no heuristic."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observe("Say 1.")

    def step_text(self, text):
        done = envs.first_int(text) == 1
        return self.result("ok" if done else "no", {"success": float(done)}, terminated=done, success=done)

    def expert_action(self, noise=None):
        return str(int(self.expert_rng.integers(0, 3))) if self.wants_noise(noise) else "1"


class NoTeacher(ExpertOnly):
    expert_action = None


@pytest.fixture
def teacherless_ids():
    ids = {"tests_teachers/ExpertOnly-v0": ExpertOnly, "tests_teachers/NoTeacher-v0": NoTeacher}
    for env_id, cls in ids.items():
        gym.register(env_id, entry_point=cls, max_episode_steps=5)
    yield list(ids)
    for env_id in ids:
        del gym.registry[env_id]


def test_envs_without_a_heuristic_fail_clearly_naming_the_env_and_the_fix(teacherless_ids):
    expert_only, no_teacher = teacherless_ids
    with pytest.raises(ValueError, match=r"tests_teachers/ExpertOnly-v0 has no heuristic_action\(\).*Implement heuristic_action\(self, noise=None\)"):
        envs.expert_episode(expert_only, 0, policy="heuristic")
    with pytest.raises(ValueError, match="ExpertOnly has no heuristic_action"):  # the base method, called directly
        ExpertOnly().heuristic_action()
    with pytest.raises(ValueError, match="Mastermind-v0 has no heuristic_action"):  # a built-in without one
        envs.expert_stats("Mastermind-v0", 5, policy="heuristic")
    # random falls back on the expert's noise; with neither expert nor random_action, on gymnasium's random
    # agent: samples of the action space, seeded by the episode's seed
    assert envs.expert_episode(expert_only, 0, policy="random").num_turns >= 1
    first, again, other = (envs.expert_episode(no_teacher, seed, policy="random") for seed in (0, 0, 1))
    assert first.num_turns == 5 and first.messages == again.messages != other.messages

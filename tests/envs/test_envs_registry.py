import re
import warnings

import gymnasium as gym
import pytest

from hybrid_rl import envs
from hybrid_rl.envs import registry


def test_import_registers_every_builtin_in_the_hybrid_rl_namespace():
    ids = envs.env_ids()
    for name in ("GuessNumber-v0", "FrozenLake-v1", "Taxi-v3", "CliffWalking-v1", "Blackjack-v1",
                 "Calculator-v0", "Arithmetic-v0", "Mastermind-v0"):
        assert f"hybrid_rl/{name}" in ids
        assert f"hybrid_rl/{name}" in gym.registry  # gymnasium's own registry, so gymnasium.make works too


def test_max_episode_steps_is_the_turn_limit():
    env = envs.make("hybrid_rl/GuessNumber-v0", max_episode_steps=3)
    env.reset(seed=0)
    outs = [env.step("garbage") for _ in range(3)]
    assert [o[3] for o in outs] == [False, False, True]
    assert envs.max_turns("GuessNumber-v0") == 8


def test_bare_name_means_the_hybrid_rl_environment_not_gymnasiums():
    env = envs.make("FrozenLake-v1")
    obs, _ = env.reset(seed=0)
    assert isinstance(obs, str) and env.spec.id == "hybrid_rl/FrozenLake-v1"


def test_gymnasium_make_works_after_import():
    obs, info = gym.make("hybrid_rl/GuessNumber-v0").reset(seed=1)
    assert obs == "Guess a number between 1 and 16." and info["role"] == "user"


@pytest.mark.parametrize("bad_id", ["GuesNumber-v0", "hybrid_rl/GuesNumber-v0"])
def test_unknown_id_gives_gymnasiums_did_you_mean_and_our_list(bad_id):
    with pytest.raises(envs.UnknownEnvironmentError) as err:
        envs.make(bad_id)
    message = str(err.value)
    assert "Did you mean: `GuessNumber`" in message
    assert "hybrid_rl/Mastermind-v0" in message and "hybrid_rl/Taxi-v3" in message
    assert isinstance(err.value, gym.error.Error)  # callers that catch gymnasium's errors still do


def test_unknown_version_is_reported_by_gymnasium_too():
    with pytest.raises(envs.UnknownEnvironmentError) as err:
        envs.make("hybrid_rl/GuessNumber-v7")
    # gymnasium's own words (the version asked for, the versions there are), then our list of environments
    assert re.search(r"version `v7`.*doesn't exist.*`v0`", str(err.value)), str(err.value)
    assert "hybrid_rl/GuessNumber-v0" in str(err.value).split("hybrid_rl environments:")[1]


def test_seeds_are_reproducible_and_train_eval_disjoint():
    train, eval_ = envs.seeds("GuessNumber-v0", "train", 500), envs.seeds("GuessNumber-v0", "eval", 500)
    val = envs.seeds("GuessNumber-v0", "val", 500)
    assert len(train) == len(set(train)) == 500 and not set(train) & set(eval_)
    assert not set(val) & (set(train) | set(eval_))
    assert train == envs.seeds("hybrid_rl/GuessNumber-v0", "train", 500)
    with pytest.raises(ValueError, match="'train', 'val', 'eval'"):
        envs.seeds("GuessNumber-v0", "test", 3)
    with pytest.raises(envs.UnknownEnvironmentError):
        envs.seeds("NoSuchEnv-v0", "train", 3)


def test_describe_is_the_class_docstring_first_line():
    assert envs.describe("GuessNumber-v0").startswith("Find a hidden number in [1, N]")


class _FakeEntryPoint:
    def __init__(self, name, fn):
        self.name, self.value, self._fn = name, f"fake:{name}", fn

    def load(self):
        return self._fn


def test_plugins_register_through_the_entry_point_group_and_a_broken_one_only_warns(monkeypatch):
    def good():
        gym.register(id="hybrid_rl_test/Plugged-v0", entry_point="hybrid_rl.envs.guess_number:GuessNumber", max_episode_steps=4)

    def broken():
        raise ImportError("missing dependency")

    def takes_registry(registry):  # the entry point is called with no arguments
        gym.register(id="hybrid_rl_test/Never-v0", entry_point="hybrid_rl.envs.guess_number:GuessNumber")

    def entry_points(group):
        assert group == "hybrid_rl.envs"
        return [_FakeEntryPoint("test-good", good), _FakeEntryPoint("test-broken", broken),
                _FakeEntryPoint("test-args", takes_registry)]

    monkeypatch.setattr(registry.importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_plugin_ids", {})
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = envs.load_plugins()
        assert loaded == {"test-good": ["hybrid_rl_test/Plugged-v0"], "test-broken": [], "test-args": []}
        assert any("test-broken" in str(w.message) and "missing dependency" in str(w.message) for w in caught)
        assert any("test-args" in str(w.message) and "a function `register()` (no parameters)" in str(w.message)
                   for w in caught)
        assert not any("test-broken" in str(w.message) and "no parameters" in str(w.message) for w in caught)
        assert "hybrid_rl_test/Plugged-v0" in envs.env_ids()  # listed although outside the hybrid_rl namespace
    finally:
        gym.registry.pop("hybrid_rl_test/Plugged-v0", None)


def test_arguments_in_the_id_name_one_setting_everywhere():
    env = envs.make("hybrid_rl/GuessNumber-v0(n=100;turn_penalty=0.05)")
    obs, _ = env.reset(seed=1)
    assert obs == "Guess a number between 1 and 100." and env.unwrapped.turn_penalty == 0.05
    assert envs.make("GuessNumber-v0(n=100)", n=50).unwrapped.n == 50  # explicit kwargs win
    assert envs.seeds("hybrid_rl/GuessNumber-v0(n=100)", "eval", 3) == envs.seeds("hybrid_rl/GuessNumber-v0", "eval", 3)
    from hybrid_rl.metrics import env_key

    assert env_key("hybrid_rl/GuessNumber-v0(n=100)") == "GuessNumber-v0(n=100)"
    assert env_key("my_module:my/Env-v0(n=1)") == "my.Env-v0(n=1)"  # the module only says what to import
    with pytest.raises(ValueError, match="key=value"):
        envs.make("hybrid_rl/GuessNumber-v0(n)")

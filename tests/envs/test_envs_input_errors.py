"""Bad user input (an env id, its arguments, a model's action) gets a clear error naming the problem and the fix;
a model's malformed action is an invalid action with a message, never an exception from ``step``."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_rl import envs
from hybrid_rl.cli import main
from hybrid_rl.config import ConfigError

HYBRID_RL = str(Path(sys.executable).with_name("hybrid-rl"))
NESTED = "<tool_call>" + "[" * 1500 + "</tool_call>"


def _mean_turns(out: str) -> float:
    return float(re.search(r"mean turns ([0-9.]+)", out).group(1))


def test_cli_check_and_expert_apply_the_ids_arguments(capsys, tmp_path):
    """1. ``envs check ID(...)`` and ``envs expert ID(...)`` play the id's arguments, not the defaults; an argument
    given both in the id and as --arg with different values is an error naming both."""
    missing = tmp_path / "nonexistent.jsonl"
    assert main(["envs", "check", f"hybrid_rl/Dataset-v0(path={missing})", "--episodes", "5"]) == 1
    out = capsys.readouterr().out
    assert f"hybrid_rl/Dataset-v0(path={missing}): FAIL" in out and f"path={str(missing)!r}: no such file" in out
    assert main(["envs", "check", "hybrid_rl/GuessNumber-v0(n=abc)", "--episodes", "5"]) == 1
    out = capsys.readouterr().out
    assert "FAIL make: ValueError: GuessNumber n='abc': expected an integer >= 2" in out

    assert main(["envs", "expert", "hybrid_rl/GuessNumber-v0(n=100)", "--episodes", "20", "--show", "1"]) == 0
    in_id = capsys.readouterr().out
    assert main(["envs", "expert", "hybrid_rl/GuessNumber-v0", "--episodes", "20", "--arg", "n=100"]) == 0
    as_arg = capsys.readouterr().out
    assert "Guess a number between 1 and 100." in in_id and "hybrid_rl/GuessNumber-v0(n=100) expert" in in_id
    assert _mean_turns(in_id) == _mean_turns(as_arg) > 4.5  # n=16 would take about 3.4 turns

    assert main(["envs", "expert", "GuessNumber-v0(n=100)", "--arg", "n=50", "--episodes", "2"]) == 2
    err = capsys.readouterr().err
    assert "n=100 in the env id 'GuessNumber-v0(n=100)'" in err and "--arg n=50" in err
    assert main(["envs", "check", "GuessNumber-v0(n=100)", "--arg", "n=50", "--episodes", "2"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert envs.check("GuessNumber-v0(n=100)", episodes=3, turn_penalty=0.0).passed  # no clash: merged


def test_check_env_ids_turns_import_failures_and_bad_arguments_into_config_errors(tmp_path, monkeypatch):
    """2. The pre-flight check of a run's env list: an unimportable ``module:id``, an env module that raises on
    import (any exception) and kwargs the constructor refuses are ``ConfigError``s naming the id and the fix."""
    with pytest.raises(ConfigError, match=r"nosuchmodule:foo/Bar-v0.*cannot import the module 'nosuchmodule'"):
        envs.check_env_ids(["nosuchmodule:foo/Bar-v0"])
    (tmp_path / "input_errors_raising_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"pool.env_modules: importing 'input_errors_raising_mod' raised RuntimeError: boom"):
        envs.check_env_ids(["hybrid_rl/GuessNumber-v0"], ["input_errors_raising_mod"])
    with pytest.raises(ConfigError, match=r"input_errors_raising_mod.*raised RuntimeError: boom at import; fix that module"):
        envs.check_env_ids(["input_errors_raising_mod:foo/Bar-v0"])
    with pytest.raises(ConfigError, match=r"'hybrid_rl/GuessNumber-v0\(nn=3\)' cannot be made.*no argument 'nn'.*takes n, "):
        envs.check_env_ids(["hybrid_rl/GuessNumber-v0(nn=3)"])
    with pytest.raises(ConfigError, match=r"GuessNumber-v0\(n=abc\)' cannot be made.*n='abc': expected an integer"):
        envs.check_env_ids(["hybrid_rl/GuessNumber-v0(n=abc)"])
    envs.check_env_ids(["hybrid_rl/GuessNumber-v0(n=100)", "FrozenLake-v1(size=5)"])  # good ids pass
    # kwargs given to gymnasium.register, not in the id: the fix is the registration, not "the id's arguments"
    (tmp_path / "input_errors_badkw_mod.py").write_text(
        "import gymnasium as gym\n"
        "gym.register('badkw/Guess-v0', entry_point='hybrid_rl.envs.guess_number:GuessNumber', kwargs={'nn': 3})\n")
    with pytest.raises(ConfigError, match=r"(?s)badkw/Guess-v0' cannot be made.*'nn'.*constructor or the kwargs it is "
                                          r"registered with \(gymnasium.register"):
        envs.check_env_ids(["input_errors_badkw_mod:badkw/Guess-v0"])
    # a reset that cannot work passed the check, and a run then trained on nothing (every episode env_error, NaN metrics)
    (tmp_path / "input_errors_noseed_mod.py").write_text(
        "import gymnasium as gym\n"
        "class NoSeed(gym.Env):\n"
        "    observation_space = action_space = gym.spaces.Text(64)\n"
        "    def reset(self):\n"
        "        return 'hi', {}\n"
        "    def step(self, action):\n"
        "        return 'ok', 1.0, True, False, {}\n"
        "gym.register('noseed/NoSeed-v0', entry_point=NoSeed)\n")
    with pytest.raises(ConfigError, match=r"(?s)'input_errors_noseed_mod:noseed/NoSeed-v0' fails its first reset.*"
                                          r"unexpected keyword argument 'seed'.*envs check"):
        envs.check_env_ids(["input_errors_noseed_mod:noseed/NoSeed-v0"])

    monkeypatch.chdir(tmp_path)  # the pipeline stops before any work, with the message instead of a traceback
    done = subprocess.run([HYBRID_RL, "pipeline", "envs=[hybrid_rl/GuessNumber-v0(nn=3)]"], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "has no argument 'nn'" in done.stderr, done.stderr[-2000:]


PROBED = """
import time
import gymnasium as gym


class Probed(gym.Env):
    observation_space = action_space = gym.spaces.Text(64)

    def __init__(self, kind=""):
        self.kind = kind
        if kind == "slow":
            time.sleep(0.4)

    def reset(self, *, seed=None, options=None):
        if self.kind == "hang-reset":
            time.sleep(3)
        if self.kind == "slow":
            time.sleep(0.4)
        if self.kind == "bare-reset":
            return "hi"  # old gym: the observation alone
        return (["not", "text"] if self.kind == "list-obs" else "hi"), {}

    def step(self, action):
        if self.kind == "slow":
            time.sleep(0.4)
        if self.kind == "string-flag":
            return "ok", 1.0, "False", False, {}
        if self.kind == "four-tuple":
            return "ok", 1.0, True, {}
        if self.kind == "raise-step":
            raise KeyError(action)
        if self.kind == "nan-reward":
            return "ok", float("nan"), True, False, {}
        return "ok", 1.0, True, False, {}

    def close(self):
        if self.kind == "raise-close":
            raise RuntimeError("subprocess already dead")


gym.register("probed/Probed-v0", entry_point=Probed)
"""


@pytest.mark.parametrize("kind, message", [
    ("bare-reset", r"fails its first reset \(train seed 0\): reset returned str, expected \(observation, info\)"),
    ("list-obs", r"reset returned a list observation, expected str"),
    ("four-tuple", r"(?s)fails its first step \(action '\?'\): step returned a 4-tuple.*LegacyStepAPI"),
    ("raise-step", r"(?s)fails its first step \(action '\?'\): KeyError: '\?'.*arbitrary text.*invalid action"),
    ("nan-reward", r"fails its first step.*step returned reward nan, expected a finite number"),
    ("hang-reset", r"(?s)did not return from env.reset within 0.5 s \(the stage's env_timeout_s\).*envs check"),
    ("string-flag", r"fails its first step.*step returned terminated = 'False' \(str\), expected a bool"),
])
def test_check_env_ids_plays_one_reset_and_step_as_the_engine_reads_them(kind, message, tmp_path, monkeypatch):
    """What every episode of a run would end as env_error or timeout for (and the run train on nothing, with NaN
    metrics and exit 0) fails before the run: a reset or step whose result the engine cannot read, a step that
    raises on arbitrary text, a reset that hangs (bounded by the stage's env_timeout_s)."""
    (tmp_path / "input_errors_probed_mod.py").write_text(PROBED)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        envs.check_env_ids([f"input_errors_probed_mod:probed/Probed-v0(kind={kind})"], timeout_s=0.5)


def test_check_env_ids_times_the_reset_and_the_step_each_as_a_run_does(tmp_path, monkeypatch):
    """A constructor, reset and step of 0.4 s each pass a limit of 0.5 s per call (one limit over all three refused
    it), and a probe left hanging changes no warnings filter of the process."""
    import warnings

    (tmp_path / "input_errors_probed_mod.py").write_text(PROBED)
    monkeypatch.syspath_prepend(str(tmp_path))
    envs.check_env_ids(["input_errors_probed_mod:probed/Probed-v0(kind=slow)"], timeout_s=0.5)
    before = list(warnings.filters)
    with pytest.raises(ConfigError, match="did not return from env.reset"):
        envs.check_env_ids(["input_errors_probed_mod:probed/Probed-v0(kind=hang-reset)"], timeout_s=0.2)
    assert warnings.filters == before


def test_check_env_ids_passes_an_env_whose_close_fails_with_a_warning(tmp_path, monkeypatch, caplog):
    (tmp_path / "input_errors_probed_mod.py").write_text(PROBED)
    monkeypatch.syspath_prepend(str(tmp_path))
    envs.check_env_ids(["input_errors_probed_mod:probed/Probed-v0(kind=raise-close)"])
    assert "env.close() failed: RuntimeError: subprocess already dead" in caplog.text


@pytest.mark.parametrize("env_id, message", [
    ("FrozenLake-v1(frozen_prob=0)", r"FrozenLake frozen_prob=0: expected a number in \(0, 1\]"),
    ("FrozenLake-v1(frozen_prob=-1)", r"frozen_prob=-1: expected a number in \(0, 1\]"),
    ("FrozenLake-v1(frozen_prob=1.5)", r"frozen_prob=1.5: expected a number in \(0, 1\]"),
    ("FrozenLake-v1(is_slippery=maybe)", r"FrozenLake is_slippery='maybe': expected true or false"),
    ("Blackjack-v1(natural=maybe)", r"Blackjack natural='maybe': expected true or false"),
    ("Blackjack-v1(sab=1)", r"Blackjack sab=1: expected true or false"),
    ("CliffWalking-v1(is_slippery=2)", r"CliffWalking is_slippery=2: expected true or false"),
])
def test_toy_text_arguments_are_checked_in_the_constructor(env_id, message):
    """3. FrozenLake's frozen_prob outside (0, 1] (0 made reset loop forever) and non-bool flags are refused when
    the env is made, naming the key and what it takes; maps that take too many draws end reset with an error."""
    with pytest.raises(ValueError, match=message):
        envs.make(env_id)
    assert envs.make("Blackjack-v1(natural=true;sab=false)").unwrapped.inner.natural is True
    from hybrid_rl.envs.toy_text import random_map

    with pytest.raises(ValueError, match="frozen_prob=0.01; raise frozen_prob"):
        random_map(4, 0.01, seed=0, draws=1000)  # a valid map is about 1e-9 likely: gymnasium would draw for hours


@pytest.mark.parametrize("env_id, message", [
    ("GuessNumber-v0(n=abc)", r"GuessNumber n='abc': expected an integer >= 2"),
    ("GuessNumber-v0(n=1e9)", r"n='1e9': expected an integer.*reads '1e9' as text: write n=1000000000"),
    ("GuessNumber-v0(n=100,turn_penalty=1)", r"n='100,turn_penalty=1': expected an integer.*separated by ';', not ','"),
    ("GuessNumber-v0(turn_penalty=abc)", r"GuessNumber turn_penalty='abc': expected a number"),
    ("PythonTool-v0(tasks=)", r"PythonTool tasks=None: choose one or more of"),
])
def test_guess_number_and_python_tool_name_the_bad_argument(env_id, message):
    """4. A kwarg of the wrong type is a ValueError naming it and the type expected (not "'<' not supported")."""
    with pytest.raises(ValueError, match=message):
        envs.make(env_id)


@pytest.mark.parametrize("env_id", ["Calculator-v0", "PythonTool-v0", "adapter_test_envs:adapter_test_envs/Vault-v0"])
def test_a_deeply_nested_tool_call_is_an_invalid_action(env_id):
    """5. JSON nested past the recursion limit is a malformed tool call (an invalid action with a message), not a
    RecursionError that ends the episode as an env error; the checker's bad actions try it."""
    with pytest.raises(envs.ToolCallError, match="nested too deeply"):
        envs.parse_tool_call(NESTED)
    env = envs.make(env_id)
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(NESTED)
    assert info["invalid_action"] is True and "nested too deeply" in obs
    from hybrid_rl.envs.checker import BAD_ACTIONS

    assert NESTED in BAD_ACTIONS.values()


def test_calculator_calls_an_unknown_tool_an_invalid_action_as_python_tool_does():
    from hybrid_rl import envs
    from hybrid_rl.envs.tools import format_tool_call

    for env_id, known in (("hybrid_rl/Calculator-v0", "calc"), ("hybrid_rl/PythonTool-v0", "python")):
        env = envs.make(env_id)
        env.reset(seed=0)
        obs, _, _, _, info = env.step(format_tool_call("search", {"query": "x"}))
        assert info["invalid_action"] and "unknown tool 'search'" in obs and known in obs, (env_id, obs)
        env.close()

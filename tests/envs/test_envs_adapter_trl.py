"""A TRL environment_factory environment (tests/envs/adapter_test_envs.py: Vault) plays through TRLEnv:
public methods are tools in hybrid-rl's tool-call format, get_reward() the reward at the first answer;
tool-call mistakes are invalid actions that say how to call; the checker passes it and RL trains on it."""

from __future__ import annotations

import json

import pytest

import adapter_test_envs
from hybrid_rl import envs
from hybrid_rl.cli import main
from hybrid_rl.envs.adapters import TRLEnv
from hybrid_rl.metrics import read_metrics
from test_envs_plain import RL_SMOKE

VAULT_ID = "adapter_test_envs:adapter_test_envs/Vault-v0"


def call(name, **arguments):
    return envs.format_tool_call(name, arguments)


def test_tools_are_the_public_methods_and_get_reward_scores_the_answer():
    env = envs.make(VAULT_ID)
    obs, info = env.reset(seed=5)
    assert obs == "A vault with a 3-digit code." and info["role"] == "user"
    tools = env.unwrapped.tools
    assert [t["name"] for t in tools] == ["peek", "unlock"]
    assert tools[0]["parameters"]["properties"] == {"digit": {"type": "integer"}}
    assert "peek(digit: integer): Show one digit" in env.unwrapped.system_prompt and "<tool_call>" in env.unwrapped.system_prompt
    code = str(env.unwrapped.inner.code)
    digits = [env.step(call("peek", digit=i)) for i in range(3)]
    assert "".join(d[0] for d in digits) == code
    assert all(d[4]["role"] == "tool" and not d[4]["invalid_action"] and not d[2] for d in digits)
    assert env.step(call("unlock", code=int(code)))[0] == "open"
    obs, reward, terminated, truncated, info = env.step("I opened it.")
    assert (reward, terminated, info["success"]) == (1.0, True, True)
    env.reset(seed=5)
    assert env.step("no idea")[1:3] == (0.0, True)  # an answer without unlocking: get_reward() is 0


@pytest.mark.parametrize("action, message", [
    (call("smash"), "unknown tool 'smash'; available tools: peek, unlock"),
    (call("unlock", cod=1), "bad arguments for unlock: Vault.unlock() got an unexpected keyword argument 'cod' "
                            "Call it as unlock(code: integer)."),
    (call("peek", digit=7), "IndexError: string index out of range Call it as peek(digit: integer)."),
    ('<tool_call>{"name": "peek", "arguments": </tool_call>', "not valid JSON"),
])
def test_tool_call_mistakes_are_invalid_and_say_how_to_call(action, message):
    env = envs.make(VAULT_ID)
    env.reset(seed=0)
    obs, reward, terminated, _, info = env.step(action)
    assert message in obs and info["invalid_action"] and not terminated and reward == 0.0


def test_rows_give_the_prompt_and_reach_reset():
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Open it."}], "level": 2}]
    env = TRLEnv(adapter_test_envs.Vault, rows=rows)
    obs, _ = env.reset(seed=1)
    assert obs == "Open it.\nA vault with a 3-digit code."
    assert env.system_prompt.startswith("Be brief.\nTools:")
    assert env.inner.row["level"] == 2 and env.inner.row["prompt"] == rows[0]["prompt"]


def test_vault_passes_the_check():
    report = envs.check(VAULT_ID, episodes=3)
    assert report.passed, report.format()


class _NoReset:
    def peek(self):
        return "x"


class _Silent(adapter_test_envs.Vault):
    def reset(self, **row):
        super().reset(**row)


@pytest.mark.parametrize("kwargs, message", [
    ({"factory": "adapter_test_envs:Vualt"}, "Did you mean adapter_test_envs:Vault?"),
    ({"factory": _NoReset}, "_NoReset without reset(); a TRL environment defines reset(**kwargs)"),
    ({"factory": adapter_test_envs.Vault, "rows": "no/such/rows.jsonl"}, "no such file or folder; give a JSONL file"),
])
def test_bad_adapter_input_names_the_problem_and_the_fix(kwargs, message):
    with pytest.raises(ValueError) as err:
        TRLEnv(**kwargs)
    assert message in str(err.value)


class _Counter:
    """As TRL's docs write one: no get_reward; a reward function reads the environment's state."""

    def reset(self, **row):
        self.counter = 0
        return "Count to 3."

    def increment(self, step: int) -> int:
        """Add to the counter."""
        self.counter += step
        return self.counter


def counted_to_three(environments, **kwargs):
    return [1.0 if env.counter == 3 else 0.0 for env in environments]


def said_three(completions, target):  # TRL's completions and a dataset column; no **kwargs
    return [0.5 if c.strip() == str(t) else None for c, t in zip(completions, target)]


def test_a_class_without_get_reward_is_refused_unless_reward_funcs_are_given():
    """It scored 0 in every episode without a word (TRL refuses it: "No reward source provided")."""
    with pytest.raises(ValueError, match="has no get_reward\\(\\) and no reward_funcs.*'reward_funcs': \\['module:reward_func'\\]"):
        TRLEnv(_Counter)
    env = TRLEnv(_Counter, reward_funcs=[counted_to_three, said_three], rows=[{"prompt": "Go.", "target": 3}])
    env.reset(seed=0)
    env.step(call("increment", step=3))
    obs, reward, terminated, _, info = env.step("3")
    assert (reward, terminated, info["success"]) == (1.5, True, True)
    assert info["reward_components"] == {"counted_to_three": 1.0, "said_three": 0.5}
    env.reset(seed=0)
    env.step(call("increment", step=2))
    _, reward, _, _, info = env.step("two")  # said_three is None ("not applicable"): left out
    assert (reward, info["reward_components"]) == (0.0, {"counted_to_three": 0.0})


class _BoolReward(_Counter):
    def get_reward(self):
        return self.counter == 3  # TRL takes a bool


def test_a_bool_reward_a_partial_and_two_functions_of_one_name():
    import functools

    env = TRLEnv(_BoolReward, reward_funcs=[functools.partial(said_three, target=[3])])
    env.reset(seed=0)
    env.step(call("increment", step=3))
    _, reward, _, _, info = env.step("3")
    assert (reward, info["reward_components"]) == (1.5, {"get_reward": 1.0, "said_three": 0.5})
    with pytest.raises(ValueError, match="counted_to_three named twice"):
        TRLEnv(_Counter, reward_funcs=[counted_to_three, "test_envs_adapter_trl:counted_to_three"])
    with pytest.raises(ValueError, match="get_reward named twice"):
        TRLEnv(_BoolReward, reward_funcs=[_named("get_reward")])


def _named(name):
    def fn(environments, **kwargs):
        return [0.0]
    fn.__name__ = name
    return fn


def _nan_reward(environments, **kwargs):
    return [float("nan")]


def _two_rewards(environments, **kwargs):
    return [1.0, 0.0]


class _ListReward(adapter_test_envs.Vault):
    def get_reward(self):
        return [1.0]


class _NoneReward(adapter_test_envs.Vault):
    def get_reward(self):
        return None


@pytest.mark.parametrize("kwargs, message", [
    ({"factory": _Counter, "reward_funcs": [_nan_reward]}, "reward function _nan_reward returned nan, expected a finite number"),
    ({"factory": _Counter, "reward_funcs": [_two_rewards]}, "_two_rewards returned 2 rewards for one completion"),
    ({"factory": _ListReward}, "_ListReward.get_reward() returned [1.0], expected a finite number"),
    ({"factory": _Counter, "reward_funcs": ["test_envs_adapter_trl:counted_to_thre"]}, "Did you mean test_envs_adapter_trl:counted_to_three?"),
])
def test_a_reward_that_is_not_a_number_names_its_function(kwargs, message):
    with pytest.raises(ValueError) as err:
        env = TRLEnv(**kwargs)
        env.reset(seed=0)
        env.step("an answer")
    assert message in str(err.value)


def test_nothing_to_show_the_model_says_what_to_return():
    with pytest.raises(ValueError, match="returned None and no row has a 'prompt'.*Return the task's text from reset"):
        TRLEnv(_Silent).reset(seed=0)


def test_bad_rows_file_names_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a"}\n{prompt: b}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2 is not JSON"):
        TRLEnv(adapter_test_envs.Vault, rows=str(path))
    path.write_text('{"prompt": "a"}\n[1, 2]\n')  # JSON, but not a row: it said "must be a list of dicts", no line
    with pytest.raises(ValueError, match=r"rows.jsonl:2 is a list, not an object"):
        TRLEnv(adapter_test_envs.Vault, rows=str(path))


def test_rows_may_be_parquet_as_skyrl_writes_them(tmp_path):
    """A .parquet rows file was read as JSONL text: UnicodeDecodeError, naming neither the file nor the fix."""
    import datasets

    datasets.Dataset.from_list([{"prompt": "Open the vault.", "level": 1}]).to_parquet(str(tmp_path / "rows.parquet"))
    env = TRLEnv(adapter_test_envs.Vault, rows=str(tmp_path / "rows.parquet"))
    assert env.reset(seed=0)[0].startswith("Open the vault.") and env.inner.row == {"prompt": "Open the vault.", "level": 1}


def test_vault_trains_with_rl(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["rl", *RL_SMOKE, f"envs=[{VAULT_ID}]", "run.name=vault"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"].endswith("step_2")
    rows = read_metrics(tmp_path / "runs" / "vault")
    assert [r["step"] for r in rows if "rollout/reward" in r] == [1, 2]
    assert "rollout/success/adapter_test_envs.Vault-v0" in rows[-1]


class _VerifiersLike:
    def env_response(self, messages, state):
        return [], state

    def is_completed(self, messages, state):
        return True


def test_a_class_registered_without_its_adapter_is_told_which_adapter_fits():
    """A TRL class registered directly got old gym's hint and 'Fix the id's arguments' (it has no arguments)."""
    import gymnasium as gym

    from hybrid_rl.config import ConfigError

    gym.register("adapter_test_envs/VaultRaw-v0", entry_point=adapter_test_envs.Vault)
    gym.register("adapter_test_envs/VerifiersRaw-v0", entry_point=_VerifiersLike)
    try:
        with pytest.raises(ConfigError) as err:
            envs.check_env_ids(["adapter_test_envs/VaultRaw-v0"])
        text = str(err.value)
        assert "is not a gymnasium env" in text and "entry_point='hybrid_rl.envs.adapters:TRLEnv'" in text
        assert "LegacyStepAPI" not in text and "Fix the id's arguments" not in text
        with pytest.raises(TypeError, match="A verifiers environment is not played as it is.*TextEnv"):
            envs.make("adapter_test_envs/VerifiersRaw-v0")
    finally:
        for env_id in ("adapter_test_envs/VaultRaw-v0", "adapter_test_envs/VerifiersRaw-v0"):
            gym.registry.pop(env_id, None)


def test_no_reward_applies_scores_0_warned_as_in_trl():
    env = TRLEnv(_NoneReward)
    env.reset(seed=0)
    with pytest.warns(RuntimeWarning, match="every reward \\(get_reward\\(\\)\\) was None for this episode; it scores 0"):
        assert env.step("an answer")[1:3] == (0.0, True)


def last_message_is_three(completions, **kwargs):  # TRL's conversational shape: each completion is messages
    return [1.0 if c[-1]["content"].strip() == "3" else 0.0 for c in completions]


def raises(completions, **kwargs):
    raise KeyError("score")


def test_conversational_rows_give_messages_to_reward_functions_and_their_errors_name_them():
    rows = [{"prompt": [{"role": "user", "content": "Count to 3."}]}]
    env = TRLEnv(_Counter, rows=rows, reward_funcs=[last_message_is_three])
    env.reset(seed=0)
    assert env.step("3")[1] == 1.0
    env = TRLEnv(_Counter, rows=rows, reward_funcs=[raises])
    env.reset(seed=0)
    with pytest.raises(ValueError, match="reward function raises raised KeyError: 'score'.*completions=\\[\\[message\\]\\]"):
        env.step("3")

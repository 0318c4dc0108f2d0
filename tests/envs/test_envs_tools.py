import time

import pytest

from hybrid_rl import envs
from hybrid_rl.envs.calculator import calc
from hybrid_rl.envs.tools import ToolCall, ToolCallError, call_tool, format_tool_call, parse_tool_call


def test_format_and_parse_round_trip():
    text = format_tool_call("calc", {"expression": "3*4"})
    assert text == '<tool_call>{"name": "calc", "arguments": {"expression": "3*4"}}</tool_call>'
    assert parse_tool_call(f"Let me compute. {text} ok") == ToolCall("calc", {"expression": "3*4"})


def test_text_without_a_tool_call_is_an_answer():
    assert parse_tool_call("57") is None


@pytest.mark.parametrize("text, message", [
    ("<tool_call>{oops}</tool_call>", "not valid JSON"),
    ('<tool_call>{"name": "calc"', "not closed"),
    ('{"name": "calc"}</tool_call>', "without <tool_call>"),
    ('<tool_call>{"arguments": {}}</tool_call>', '"name" string'),
    ('<tool_call>{"name": "calc", "arguments": [1]}</tool_call>', "JSON object"),
    ("<tool_call>[1, 2]</tool_call>", '"name" string'),
])
def test_malformed_calls_raise_a_message_with_the_right_format(text, message):
    with pytest.raises(ToolCallError, match=message) as err:
        parse_tool_call(text)
    assert format_tool_call("calc", {"expression": "3*4"}) in str(err.value)


def test_a_raising_tool_becomes_an_error_observation():
    def boom(**_):
        raise RuntimeError("disk on fire")

    result = call_tool(ToolCall("boom", {}), {"boom": boom}, timeout_s=1.0)
    assert not result.ok and result.output == "error: RuntimeError: disk on fire"


def test_a_hanging_tool_is_cut_off_by_the_timeout():
    start = time.perf_counter()
    result = call_tool(ToolCall("sleep", {}), {"sleep": lambda: time.sleep(30)}, timeout_s=0.2)
    assert not result.ok and "timed out after 0.2 s" in result.output
    assert time.perf_counter() - start < 10  # returned long before the tool would have


def test_calculator_env_reports_a_hanging_tool_and_goes_on():
    env = envs.make("Calculator-v0", tool_timeout_s=0.1)
    env.reset(seed=0)
    env.unwrapped.tool_functions["calc"] = lambda expression: time.sleep(30)
    obs, reward, terminated, truncated, info = env.step(format_tool_call("calc", {"expression": "1+1"}))
    assert "timed out" in obs and info["role"] == "tool" and not terminated and not truncated


@pytest.mark.parametrize("expression, expected", [("3*4", "12"), ("(12+7)*3", "57"), ("7/2", "3.5"), ("-2+5", "3"), ("8/4", "2")])
def test_calc(expression, expected):
    assert calc(expression) == expected


@pytest.mark.parametrize("expression, message", [
    ("__import__('os')", "unsupported"), ("9**9**9", "unsupported"), ("10000000*10000000*100", "too large"),
    ("1/0", "division by zero"), ("", "non-empty"), ("1+" * 200 + "1", "longer than"), ("2 +", "cannot parse"),
])
def test_calc_refuses_what_it_cannot_bound(expression, message):
    with pytest.raises(ValueError, match=message):
        calc(expression)

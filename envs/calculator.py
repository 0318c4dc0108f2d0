"""Arithmetic with and without a tool.

- ``Calculator``: a two-operation question ("What is (12+7)*3?") answered by calling the ``calc`` tool
  once per operation and then answering with the number: multi-step tool use. Tool calls use the one
  format of ``hybrid_rl.envs.tools``; a malformed call is answered with what was wrong.
- ``Arithmetic``: single-turn "23+45=" -> "68" (the task used to compare with peer trainers).
"""

from __future__ import annotations

import ast
import operator

from hybrid_rl.envs.core import TextEnv, first_int, quote
from hybrid_rl.envs.tools import ToolCallError, call_tool, format_tool_call, parse_tool_call

__all__ = ["Calculator", "Arithmetic", "calc"]

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 10**15  # bounds the work: no 9**9**9, no 10**6-digit products


def calc(expression: str) -> str:
    """Evaluate + - * / // % and parentheses on numbers; raises ValueError with the reason."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("expression must be a non-empty string such as '3*4'")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}; use numbers, + - * / and parentheses") from None
    value = _eval(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(round(value, 6) if isinstance(value, float) else value)


def _eval(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if right == 0 and type(node.op) in (ast.Div, ast.FloorDiv, ast.Mod):
            raise ValueError("division by zero")
        return _bounded(_OPS[type(node.op)](left, right))
    raise ValueError(f"unsupported {type(node).__name__}; use numbers, + - * / and parentheses")


def _bounded(value):
    if abs(value) > MAX_MAGNITUDE:
        raise ValueError(f"number too large (limit {MAX_MAGNITUDE:.0e})")
    return value


CALC_SPEC = {
    "name": "calc",
    "description": "Evaluate an arithmetic expression (+ - * / and parentheses).",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
}


class Calculator(TextEnv):
    """Answer an arithmetic question by calling the calc tool step by step, then giving the number.

    Observation: "What is (12+7)*3?"; tool results come back as role "tool" ("19").
    Actions: a tool call ``<tool_call>{"name": "calc", "arguments": {"expression": "12+7"}}</tool_call>``
    or the answer ("57"). Reward: 1.0 for the right answer, minus ``turn_penalty`` per turn.
    Expert: one calc call per operation, innermost first, then the answer.
    """

    system_prompt = ('Use the calc tool: <tool_call>{"name": "calc", "arguments": {"expression": "2+3"}}</tool_call> '
                     "then reply with the number.")
    tools = [CALC_SPEC]

    def __init__(self, operations: int = 2, max_operand: int = 20, turn_penalty: float = 0.02,
                 tool_timeout_s: float = 2.0, render_mode: str | None = None, expert_noise: float = 0.0):
        super().__init__(render_mode=render_mode, expert_noise=expert_noise)
        if operations < 1 or max_operand < 2:
            raise ValueError(f"operations={operations}, max_operand={max_operand}: need operations >= 1 and max_operand >= 2.")
        self.operations, self.max_operand = operations, max_operand
        self.turn_penalty, self.tool_timeout_s = turn_penalty, tool_timeout_s
        self.tool_functions = {"calc": calc}
        self.steps: list[tuple[str, int]] = []  # the expert's plan: (expression with earlier results filled in, value)
        self.answer = 0
        self.seen_results: set[str] = set()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        value = int(self.np_random.integers(2, self.max_operand + 1))
        question, self.steps = str(value), []
        for _ in range(self.operations):
            op = "+-*"[int(self.np_random.integers(3))]
            operand = int(self.np_random.integers(2, self.max_operand + 1))
            expression = f"{value}{op}{operand}"
            value = int(calc(expression))
            question = f"({question}){op}{operand}" if self.steps else expression
            self.steps.append((expression, value))
        self.answer = value
        self.seen_results = set()
        return self.observe(f"What is {question}?")

    def step_text(self, text: str):
        turn = {"turn": -self.turn_penalty}
        try:
            call = parse_tool_call(text)
        except ToolCallError as err:
            return self.invalid(str(err))
        if call is not None:
            if call.name not in self.tool_functions:  # a malformed action (as in PythonTool), not a tool's answer
                return self.invalid(f"unknown tool {call.name!r}; the only tool is calc.")
            result = call_tool(call, self.tool_functions, self.tool_timeout_s)
            if result.ok:
                self.seen_results.add(result.output)
            return self.result(result.output, turn, role="tool")
        guess = first_int(text)
        if guess is None:
            return self.invalid(f"no number in {quote(text)}; call calc or answer with a number.")
        if guess == self.answer:
            return self.result("correct", {"success": 1.0, **turn}, terminated=True, success=True)
        return self.result(f"wrong, the answer is {self.answer}", turn, terminated=True)

    def expert_action(self, noise: float | None = None) -> str:
        if self.wants_noise(noise):  # a weak teacher guesses instead of computing
            return str(self.answer + int(self.expert_rng.integers(1, 10)))
        for expression, value in self.steps:
            if str(value) not in self.seen_results:
                return format_tool_call("calc", {"expression": expression})
        return str(self.answer)


class Arithmetic(TextEnv):
    """Answer a single addition "a+b=" with the number (one turn).

    Observation: "23+45=". Action: "68". Reward 1.0 if right, else 0; any answer ends the episode.
    """

    instant_steps = True  # a pure game: the engine steps it on its own thread

    ends_on_invalid = True

    def __init__(self, max_operand: int = 99, render_mode: str | None = None, expert_noise: float = 0.0):
        super().__init__(render_mode=render_mode, expert_noise=expert_noise)
        if max_operand < 1:
            raise ValueError(f"max_operand={max_operand}: need at least 1.")
        self.max_operand = max_operand
        self.a = self.b = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.a, self.b = (int(x) for x in self.np_random.integers(0, self.max_operand + 1, size=2))
        return self.observe(f"{self.a}+{self.b}=")

    def step_text(self, text: str):
        guess = first_int(text)
        if guess is None:
            return self.invalid(f"no number in {quote(text)}; answer with the sum.")
        right = guess == self.a + self.b
        return self.result("correct" if right else f"wrong, {self.a + self.b}", {"success": float(right)},
                           terminated=True, success=right)

    def expert_action(self, noise: float | None = None) -> str:
        if self.wants_noise(noise):
            return str(self.a + self.b + int(self.expert_rng.integers(1, 10)))
        return str(self.a + self.b)

"""Questions that need computation, answered with a sandboxed ``python`` tool.

``PythonTool``: a seeded question ("How many primes p satisfy 4210 <= p <= 17933?") whose answer is
a number that takes a program to find. The model calls the ``python`` tool with code; the code runs in
``hybrid_rl.envs.sandbox`` (a separate process with CPU, wall-time, memory, output and file limits, no
network, a fresh temporary directory) and what it printed, or its exception, or what the sandbox
refused or killed, comes back as a tool message. Then the model answers with the number.

Four kinds of task, each with a reference answer computed here and the program the expert sends:
``digit_powers`` (sum of k-th powers of the digits of 1..n), ``primes`` (primes in a range),
``power_mod`` (a**e mod m with e up to 10^9) and ``kth_smallest`` (an element of a sorted generated
list). Teachers: the expert runs its program and answers with the output; the heuristic answers at
once with a mental estimate (the prime number theorem, average digit powers, a uniform spread, or the
common slip a*e mod m), so it is almost always wrong, and RL has the whole gap to close.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from hybrid_rl.envs.core import TextEnv, first_int, quote
from hybrid_rl.envs.sandbox import SandboxLimits, run_python
from hybrid_rl.envs.tools import ToolCallError, format_tool_call, parse_tool_call

__all__ = ["PythonTool", "Task", "TASKS", "COMPUTATION", "PYTHON_SPEC"]

PYTHON_SPEC = {
    "name": "python",
    "description": "Run Python code in a sandbox (no network, no files outside its directory); returns what it prints.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
}


@dataclass(frozen=True)
class Task:
    question: str
    code: str       # the expert's program: prints the answer
    answer: int     # the reference, computed here without the sandbox
    estimate: int   # the heuristic's answer without running code


def digit_powers(rng: np.random.Generator) -> Task:
    n, k = int(rng.integers(1000, 20001)), int(rng.integers(2, 6))
    answer = sum(int(d) ** k for i in range(1, n + 1) for d in str(i))
    digits = sum(len(str(i)) for i in range(1, n + 1))
    return Task(f"What is the sum of the {k}-th powers of the digits of all integers from 1 to {n}?",
                f"print(sum(int(d) ** {k} for i in range(1, {n} + 1) for d in str(i)))",
                answer, round(digits * sum(d**k for d in range(10)) / 10))


def primes(rng: np.random.Generator) -> Task:
    low = int(rng.integers(2, 10001))
    high = low + int(rng.integers(1000, 20001))
    sieve = _sieve(high)
    code = (f"n = {high}\nis_p = [False, False] + [True] * (n - 1)\n"
            "for i in range(2, int(n ** 0.5) + 1):\n    if is_p[i]:\n        is_p[i*i::i] = [False] * len(is_p[i*i::i])\n"
            f"print(sum(is_p[{low}:]))")
    return Task(f"How many primes p satisfy {low} <= p <= {high}?", code, sum(sieve[low:]),
                round(high / math.log(high) - low / math.log(low)))


def _sieve(n: int) -> list[bool]:
    is_p = [False, False] + [True] * (n - 1)
    for i in range(2, math.isqrt(n) + 1):
        if is_p[i]:
            is_p[i * i::i] = [False] * len(is_p[i * i::i])
    return is_p


def power_mod(rng: np.random.Generator) -> Task:
    base, exponent, modulus = int(rng.integers(2, 100)), int(rng.integers(10**5, 10**9)), int(rng.integers(1000, 100001))
    return Task(f"What is {base}**{exponent} mod {modulus}?", f"print(pow({base}, {exponent}, {modulus}))",
                pow(base, exponent, modulus), base * exponent % modulus)


def kth_smallest(rng: np.random.Generator) -> Task:
    n, a, c, x0 = int(rng.integers(50, 201)), int(rng.integers(2, 1000)), int(rng.integers(1, 1000)), int(rng.integers(0, 10007))
    k = int(rng.integers(1, n + 1))
    values, x = [], x0
    for _ in range(n):
        x = (a * x + c) % 10007
        values.append(x)
    code = (f"x, values = {x0}, []\nfor _ in range({n}):\n    x = ({a} * x + {c}) % 10007\n    values.append(x)\n"
            f"print(sorted(values)[{k - 1}])")
    return Task(f"Let x0 = {x0} and x(i+1) = ({a}*x(i) + {c}) mod 10007. Sort x1..x{n} ascending: what is the "
                f"{k}-th number?", code, sorted(values)[k - 1], round(k / n * 10007))


def math_words(rng: np.random.Generator) -> Task:
    """A generated word problem (envs/math_words.py) computed as one expression: ``print((12+5)*2)``; the
    estimate is the common slip of stopping after the first operation."""
    from hybrid_rl.envs.math_words import problem

    p = problem(int(rng.integers(2**31)))
    expression = p.working[0].split("=")[0]
    for equation in p.working[1:]:
        left = equation.split("=")[0]
        operator = next(c for c in "+-*/" if c in left)  # the operands are non-negative: one operator
        expression = f"({expression}){operator}{left.split(operator, 1)[1]}"
    return Task(p.question, f"print({expression.replace('/', '//')})", p.answer, p.values[0])  # even splits: whole


TASKS: dict[str, Callable[[np.random.Generator], Task]] = {
    "digit_powers": digit_powers, "primes": primes, "power_mod": power_mod, "kth_smallest": kth_smallest,
    "math_words": math_words}
COMPUTATION = ("digit_powers", "primes", "power_mod", "kth_smallest")  # the default: questions that need code


class PythonTool(TextEnv):
    """Answer a question that needs computation by running code in a sandboxed python tool, then the number.

    Observation: the question; tool results come back as role "tool" (the output, an ``error: ...``, a
    ``blocked: ...`` or a ``killed: ...`` line). Actions: ``<tool_call>{"name": "python", "arguments":
    {"code": "print(6*7)"}}</tool_call>`` or the answer ("42"). Reward: ``success`` 1.0 for the right
    answer, ``turn`` -0.02 per turn, ``sandbox`` -0.05 for code that the sandbox blocked or killed,
    ``invalid`` -0.05 for an unusable action. Any answer ends the episode.
    ``tasks``: names from ``TASKS`` (in an env id joined by "+": ``PythonTool-v0(tasks=primes+power_mod)``);
    by default the four that need code. ``math_words`` is the generated word problems of MathWords-v0 as
    one expression each: the math set with the Python tool.
    """

    system_prompt = ('Run Python with the python tool: <tool_call>{"name": "python", "arguments": {"code": '
                     '"print(2+3)"}}</tool_call> then reply with the number.')
    tools = [PYTHON_SPEC]

    def __init__(self, tasks: str | tuple[str, ...] | list[str] = COMPUTATION, turn_penalty: float = 0.02,
                 sandbox_penalty: float = 0.05, cpu_s: int = 2, wall_s: float = 10.0, memory_mb: int = 256,
                 render_mode: str | None = None, expert_noise: float = 0.0):
        super().__init__(render_mode=render_mode, expert_noise=expert_noise)
        choose = f"choose one or more of {sorted(TASKS)} (in an env id joined by '+': PythonTool-v0(tasks=primes+power_mod))"
        if not isinstance(tasks, (str, list, tuple)):  # "tasks=" in an id is YAML's null
            raise ValueError(f"PythonTool tasks={tasks!r}: {choose}, or leave tasks out for {'+'.join(COMPUTATION)}.")
        tasks = tuple(tasks.split("+")) if isinstance(tasks, str) else tuple(tasks)  # "primes+power_mod" in an env id
        unknown = sorted({str(t) for t in tasks} - set(TASKS))
        if unknown or not tasks:
            raise ValueError(f"tasks={list(tasks)}: {choose}.")
        self.task_names = list(tasks)
        self.turn_penalty, self.sandbox_penalty = turn_penalty, sandbox_penalty
        self.limits = SandboxLimits(cpu_s=cpu_s, wall_s=wall_s, memory_mb=memory_mb)
        self.task = Task("", "", 0, 0)
        self.outputs: list[str] = []  # what the sandbox printed, for the expert

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        name = self.task_names[int(self.np_random.integers(len(self.task_names)))]
        self.task = TASKS[name](self.np_random)
        self.outputs = []
        return self.observe(self.task.question)

    def step_text(self, text: str):
        turn = {"turn": -self.turn_penalty}
        try:
            call = parse_tool_call(text)
        except ToolCallError as err:
            return self.invalid(str(err))
        if call is not None:
            return self._run(call.name, call.arguments, turn)
        guess = first_int(text)
        if guess is None:
            return self.invalid(f"no number in {quote(text)}; call python or answer with a number.")
        if guess == self.task.answer:
            return self.result("correct", {"success": 1.0, **turn}, terminated=True, success=True)
        return self.result(f"wrong, the answer is {self.task.answer}", turn, terminated=True)

    def _run(self, name: str, arguments: dict, turn: dict):
        if name != "python":
            return self.invalid(f"unknown tool {name!r}; the only tool is python.")
        code = arguments.get("code")
        if not isinstance(code, str) or not code.strip():
            return self.invalid('python needs "code", a string of Python. Write ' + format_tool_call("python", {"code": "print(6*7)"}))
        outcome = run_python(code, self.limits)
        self.outputs.append(outcome.output.strip())
        cost = {"sandbox": -self.sandbox_penalty} if outcome.status in ("blocked", "killed") else {}
        return self.result(outcome.text(), {**turn, **cost}, role="tool")

    def expert_action(self, noise: float | None = None) -> str:
        if self.wants_noise(noise):  # a weak teacher answers without checking
            return str(self.task.answer + int(self.expert_rng.integers(1, 10)))
        if str(self.task.answer) in self.outputs:
            return str(self.task.answer)
        return format_tool_call("python", {"code": self.task.code})

    def heuristic_action(self, noise: float | None = None) -> str:
        """Answer at once with an estimate: no code, so right only by luck."""
        if self.wants_noise(noise):
            return self.random_action()
        return str(self.task.estimate)

    def random_action(self) -> str:
        """Half the time a python call that prints a random number, else a random number as the answer."""
        guess = int(self.expert_rng.integers(0, 2 * max(self.task.answer, 10)))
        if self.expert_rng.random() < 0.5:
            return format_tool_call("python", {"code": f"print({guess})"})
        return str(guess)

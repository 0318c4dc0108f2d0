"""MathWords: seeded, procedurally generated multi-step arithmetic word problems (nothing to download).

A problem is a start quantity and 1-3 operations, one sentence each, then the question:
``Maya has 12 shells. Maya buys 5 more shells. Maya doubles the number of shells. How many shells does
Maya have now?`` (answer 34). Quantities stay whole and non-negative: a subtraction never takes more than
there is, a division only splits evenly. The same seed gives the same problem everywhere; different seeds
can give the same problem (small numbers), as in every generated environment.

``MathWords`` plays them as an ``AnswerEnv`` (numeric verifier, ``Answer: 34``). Its expert shows the working
(``12+5=17. 17*2=34. Answer: 34``); its heuristic makes a common mistake, stopping after the first operation
(``12+5=17. Answer: 17``), and on a retry applies one operation more: right on one-step problems, a third of
them. ``write_jsonl`` dumps problems as a GSM8K-style file (``{"question", "answer": "<working>\\n#### 34"}``)
or as ``{"prompt", "answer"}`` rows, for ``DatasetEnv``; row i is the problem of seed ``first_seed + i``:

    python -m hybrid_rl.envs.math_words math.jsonl --n 1000 [--style plain] [--first-seed 0]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from gymnasium.utils import seeding

from hybrid_rl.envs.dataset import AnswerEnv

__all__ = ["MathWords", "Problem", "problem", "write_jsonl"]

NAMES = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hugo", "Ines", "Jack", "Kira", "Leo", "Maya",
         "Noah", "Omar", "Priya", "Rosa", "Sam", "Tara", "Yuki")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "cards", "shells", "stamps")
TIMES = {2: "doubles", 3: "triples"}
MAX_VALUE = 999  # quantities stay three-digit: short answers for byte-level models


@dataclass(frozen=True)
class Problem:
    question: str
    working: tuple[str, ...]  # one equation per operation: "12+5=17"
    values: tuple[int, ...]  # the quantity after each operation; the last is the answer

    @property
    def answer(self) -> int:
        return self.values[-1]


def problem(seed: int, min_steps: int = 1, max_steps: int = 3, max_quantity: int = 20) -> Problem:
    """The problem of ``seed``: the start, ``min_steps``-``max_steps`` operations, the question."""
    rng = seeding.np_random(seed)[0]
    name, other = (NAMES[i] for i in rng.choice(len(NAMES), size=2, replace=False))
    item = ITEMS[int(rng.integers(len(ITEMS)))]
    value = int(rng.integers(2, max_quantity + 1))
    sentences, working, values = [f"{name} has {value} {item}."], [], []
    for _ in range(int(rng.integers(min_steps, max_steps + 1))):
        sentence, equation, value = _operation(rng, value, name, other, item, max_quantity)
        sentences.append(sentence)
        working.append(equation)
        values.append(value)
    sentences.append(f"How many {item} does {name} have now?")
    return Problem(" ".join(sentences), tuple(working), tuple(values))


def _operation(rng, value: int, name: str, other: str, item: str, max_quantity: int) -> tuple[str, str, int]:
    """One operation on ``value`` that keeps it whole, non-negative and at most ``MAX_VALUE``."""
    divisors = [k for k in (2, 3, 4, 5) if value % k == 0]
    kinds = ["add"] + ["sub"] * (value > 2) + ["mul"] * (value * 3 <= MAX_VALUE) + ["div"] * bool(divisors)
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "add":
        k = int(rng.integers(2, max_quantity + 1))  # from 2: "1 more apples" reads wrong
        said = (f"{name} buys {k} more {item}.", f"{other} gives {name} {k} {item}.")[int(rng.integers(2))]
        return said, f"{value}+{k}={value + k}", value + k
    if kind == "sub":
        k = int(rng.integers(2, value))
        said = (f"{name} gives {k} {item} to {other}.", f"{name} loses {k} {item}.")[int(rng.integers(2))]
        return said, f"{value}-{k}={value - k}", value - k
    if kind == "mul":
        k = int(rng.integers(2, 4))
        return f"{name} {TIMES[k]} the number of {item}.", f"{value}*{k}={value * k}", value * k
    k = divisors[int(rng.integers(len(divisors)))]
    return (f"{name} shares the {item} equally with {k - 1} friend{'s' * (k > 2)} and keeps one share.",
            f"{value}/{k}={value // k}", value // k)


class MathWords(AnswerEnv):
    """Solve a generated multi-step arithmetic word problem (1-3 operations); answer as 'Answer: 34'.

    Observation: ``Maya has 12 shells. Maya buys 5 more shells. ... How many shells does Maya have now?``
    Action: a reply ending ``Answer: 34`` (working before it is fine). Reward: ``correct`` 1.0 and ``format``
    0.1 on the last reply, -0.02 per reply, -0.05 for a reply without an answer. ``max_attempts`` > 1 gives
    retries with feedback (raise ``max_episode_steps`` with it). Expert: the working, then the answer.
    Heuristic: stops after the first operation (one more per retry).
    """

    def __init__(self, min_steps: int = 1, max_steps: int = 3, max_quantity: int = 20, verifier: str = "numeric", **kwargs):
        super().__init__(verifier=verifier, **kwargs)
        if not 1 <= min_steps <= max_steps or max_quantity < 2:
            raise ValueError(f"min_steps={min_steps}, max_steps={max_steps}, max_quantity={max_quantity}: "
                             f"need 1 <= min_steps <= max_steps and max_quantity >= 2.")
        self.settings = dict(min_steps=min_steps, max_steps=max_steps, max_quantity=max_quantity)
        self.problem: Problem | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.problem = problem(int(self.np_random.integers(2**31)) if seed is None else seed, **self.settings)
        return self.ask(self.problem.question, str(self.problem.answer))

    def expert_action(self, noise: float | None = None) -> str:
        if self.wants_noise(noise):
            return self.answer_format.write(self.wrong_answer())
        return self._solution(len(self.problem.working))

    def heuristic_action(self, noise: float | None = None) -> str:
        """Stops early: the first operation only, one more on each retry (a common slip on word problems)."""
        if self.wants_noise(noise):
            return self.answer_format.write(self.wrong_answer())
        return self._solution(min(self.attempts + 1, len(self.problem.working)))

    def random_action(self) -> str:
        return self.answer_format.write(str(int(self.expert_rng.integers(0, 2 * max(self.problem.values) + 10))))

    def _solution(self, steps: int) -> str:
        """The working of the first ``steps`` operations, then their result as the answer."""
        return " ".join(f"{equation}." for equation in self.problem.working[:steps]) + " " + \
            self.answer_format.write(str(self.problem.values[steps - 1]))


def write_jsonl(path: str | Path, n: int, first_seed: int = 0, style: str = "gsm8k", **settings) -> Path:
    """Write the problems of seeds ``first_seed`` ... ``first_seed + n - 1`` to ``path``, one JSON object a line:
    ``style="gsm8k"``: ``{"question", "answer": "12+5=17\\n17*2=34\\n#### 34"}``; ``"plain"``: ``{"prompt", "answer"}``."""
    if style not in ("gsm8k", "plain"):
        raise ValueError(f"style={style!r}: 'gsm8k' or 'plain'.")
    path = Path(path)
    with path.open("w") as out:
        for seed in range(first_seed, first_seed + n):
            p = problem(seed, **settings)
            row = ({"question": p.question, "answer": "\n".join([*p.working, f"#### {p.answer}"])} if style == "gsm8k"
                   else {"prompt": p.question, "answer": str(p.answer)})
            out.write(json.dumps(row) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hybrid_rl.envs.math_words", description=write_jsonl.__doc__)
    parser.add_argument("path")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--style", choices=("gsm8k", "plain"), default="gsm8k")
    args = parser.parse_args(argv)
    print(write_jsonl(args.path, args.n, args.first_seed, args.style))


if __name__ == "__main__":
    main()

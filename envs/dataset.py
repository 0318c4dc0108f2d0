"""Verifiable-answer tasks as environments: a question, a reference answer, a verifier.

``AnswerEnv`` plays one question: every reply is an attempt, its answer is found by an answer format and
scored by a verifier (``hybrid_rl.envs.verifiers``). With ``max_attempts=1`` the episode is one turn; with
more, a wrong reply is answered ``incorrect, try again (2 attempts left)`` and the model retries. The
turn limit (``max_episode_steps``) must leave room for the attempts: ``ID(max_attempts=3;max_episode_steps=3)``.

Reward components, per reply: ``turn`` (-``turn_penalty``); ``invalid`` (-``invalid_penalty``) when the reply
has no answer in the expected format; and on the reply that ends the episode ``correct`` (the verifier's
score, 1.0 when right) and ``format`` (``format_reward`` when that reply is in the expected format). The
format bonus is paid once, at the end, so a retry never earns more than being right at once.

``DatasetEnv`` draws its questions from rows (``dataset_files``): a JSONL file, a .parquet/.csv file, a
``save_to_disk`` folder or a list of dicts, with configurable column names; without a source it plays
1,000 generated ``MathWords`` problems, so the id works out of the box. Seeds map to rows
deterministically, and the registry's seed splits to disjoint rows: the rows are shuffled once (a fixed
permutation), the first ``eval_fraction`` serve eval seeds, the next ``val_fraction`` val seeds, the rest
train seeds, each split cycling through its own rows. ``eval_path`` gives eval seeds a file of their own
(GSM8K's test set); train and val then split ``path``.

Departures from peers: TRL and verifiers score a completion with reward functions outside the
environment; here the environment owns its verifier, so the same scores reach SFT demonstrations, RL and
eval, and a retry can be told why it was wrong. The expert replies with the reference answer in the
expected format: a teacher only where the reference is itself an answer (not for ``regex``).
"""

from __future__ import annotations

import functools

import gymnasium as gym

from hybrid_rl.envs.core import CHARSET, MAX_OBS_CHARS, TextEnv, quote
from hybrid_rl.envs.dataset_files import Row, load_rows
from hybrid_rl.envs.registry import EVAL_SEED_START, SPLIT_START, VAL_SEED_START
from hybrid_rl.envs.verifiers import ANSWER_FORMATS, make_verifier, to_number

__all__ = ["AnswerEnv", "DatasetEnv", "split_rows", "split_of"]

ROW_ORDER_SEED = 0  # the fixed shuffle that assigns rows to splits
GENERATED_ROWS = 1000  # DatasetEnv without a source: this many MathWords problems


class AnswerEnv(TextEnv):
    """A question with a reference answer; each reply is an attempt scored by a verifier (base class)."""

    def __init__(self, verifier: str = "math", tolerance: float = 1e-6, answer_format: str = "answer_line",
                 max_attempts: int = 1, format_reward: float = 0.1, turn_penalty: float = 0.02,
                 system_prompt: str | None = None, render_mode: str | None = None, expert_noise: float = 0.0):
        super().__init__(render_mode=render_mode, expert_noise=expert_noise)
        if max_attempts < 1 or tolerance < 0:
            raise ValueError(f"max_attempts={max_attempts}, tolerance={tolerance}: need max_attempts >= 1 and tolerance >= 0.")
        self.verify = make_verifier(verifier, tolerance)
        self.answer_format = ANSWER_FORMATS.get(answer_format)
        self.max_attempts, self.format_reward, self.turn_penalty = max_attempts, format_reward, turn_penalty
        self.system_prompt = system_prompt or f"Solve the problem; {self.answer_format.hint}."
        self.question, self.reference, self.attempts = "", "", 0

    def ask(self, question: str, reference: str) -> tuple[str, dict]:
        """Start an episode on ``question`` (the reset return value)."""
        self.question, self.reference, self.attempts = question, reference, 0
        return self.observe(question)

    def step_text(self, text: str):
        answer = self.answer_format.extract(text)
        if answer is None:
            return self.invalid(f"no answer in {quote(text)}; {self.answer_format.hint}.")
        self.attempts += 1
        last = self.attempts >= self.max_attempts
        score = self.verify(answer, self.reference)
        right = score >= 1.0
        if not (right or last):
            return self.result(f"incorrect, try again ({self._left()})", {"turn": -self.turn_penalty})
        components = {"correct": score, "format": self.format_reward, "turn": -self.turn_penalty}
        return self.result("correct" if right else "incorrect", components, terminated=True, success=right)

    def invalid(self, problem: str):
        """A reply without a usable answer: an attempt that costs ``invalid_penalty``; the last one ends the episode."""
        self.attempts += 1
        last = self.attempts >= self.max_attempts
        components = {"turn": -self.turn_penalty, "invalid": -self.invalid_penalty, **({"correct": 0.0} if last else {})}
        retry = "" if last else f" {self._left()}"
        return self.result(f"Invalid: {problem}{retry}", components, terminated=last, invalid=True)

    def _left(self) -> str:
        left = self.max_attempts - self.attempts
        return f"{left} attempt{'s' if left > 1 else ''} left"

    def expert_action(self, noise: float | None = None) -> str:
        """The reference answer in the expected format; with noise, a wrong one (``wrong_answer``)."""
        return self.answer_format.write(self.wrong_answer() if self.wants_noise(noise) else self.reference)

    def wrong_answer(self) -> str:
        """A plausible wrong answer: a number near a numeric reference, else the reference reversed."""
        number = to_number(self.reference)
        if number is None:
            return self.reference[::-1] + "?"
        return str(int(number) + int(self.expert_rng.integers(1, 10)))


class DatasetEnv(AnswerEnv):
    """Answer questions from a dataset file (JSONL, parquet, csv, save_to_disk) checked by a verifier.

    Observation: the row's prompt; then ``correct``, ``incorrect`` or, with attempts left,
    ``incorrect, try again (1 attempt left)``. Action: a reply with the answer in the expected format
    (``answer_format``, default ``Answer: <value>``). Reward: ``correct`` (1.0) + ``format`` (0.1) on the
    last reply, -0.02 per reply, -0.05 for a reply without an answer. Expert: the reference answer.
    """

    def __init__(self, path: str | None = None, rows: list[dict] | None = None, prompt_key: str = "prompt",
                 answer_key: str = "answer", reference_format: str = "full", eval_path: str | None = None,
                 eval_fraction: float = 0.1, val_fraction: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        columns = dict(prompt_key=prompt_key, answer_key=answer_key, reference_format=reference_format)
        if path is not None and rows is not None:
            raise ValueError("give path= or rows=, not both.")
        source = rows if rows is not None else path
        pool = generated_rows() if source is None else load_rows(source, **columns)
        eval_rows = None if eval_path is None else load_rows(eval_path, **columns)
        self.splits = split_rows(pool, eval_fraction, val_fraction, eval_rows)
        charset = set(CHARSET).union(*(row.prompt for row in pool + (eval_rows or [])))
        self.observation_space = gym.spaces.Text(MAX_OBS_CHARS, min_length=0, charset="".join(sorted(charset)))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        split = split_of(seed)
        rows = self.splits[split]
        index = int(self.np_random.integers(len(rows))) if seed is None else (seed - SPLIT_START[split]) % len(rows)
        return self.ask(rows[index].prompt, rows[index].reference)


def split_of(seed: int | None) -> str:
    """The registry's split a seed comes from (``envs.seeds``); no seed plays a train row."""
    if seed is None or seed < VAL_SEED_START:
        return "train"
    return "val" if seed < EVAL_SEED_START else "eval"


def split_rows(rows: list[Row], eval_fraction: float, val_fraction: float,
               eval_rows: list[Row] | None = None) -> dict[str, list[Row]]:
    """Disjoint train/val/eval rows: a fixed shuffle, then eval (unless ``eval_rows`` are given), val, train.
    A fraction of 0 leaves that split no rows of its own: it plays the train rows."""
    if not (0 <= eval_fraction and 0 <= val_fraction and eval_fraction + val_fraction < 1):
        raise ValueError(f"eval_fraction={eval_fraction}, val_fraction={val_fraction}: each in [0, 1), together under 1.")
    shuffled = [rows[i] for i in gym.utils.seeding.np_random(ROW_ORDER_SEED)[0].permutation(len(rows))]
    n_eval = 0 if eval_rows is not None else _share(len(rows), eval_fraction)
    n_val = _share(len(rows), val_fraction)
    train = shuffled[n_eval + n_val:]
    if not train:
        raise ValueError(f"{len(rows)} usable rows leave no train rows after eval_fraction={eval_fraction} and "
                         f"val_fraction={val_fraction}; give more rows, eval_path= for eval, or lower the fractions.")
    # a split with no rows of its own (fraction 0) plays the train rows
    return {"train": train, "val": shuffled[n_eval:n_eval + n_val] or train,
            "eval": eval_rows or shuffled[:n_eval] or train}


def _share(n: int, fraction: float) -> int:
    return max(1, round(n * fraction)) if fraction > 0 else 0


@functools.lru_cache(maxsize=1)
def generated_rows() -> list[Row]:
    from hybrid_rl.envs.math_words import problem

    return [Row(p.question, str(p.answer)) for p in map(problem, range(GENERATED_ROWS))]

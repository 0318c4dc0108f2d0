"""MathWords: seeded word problems whose working adds up, three teachers in order, retries, the JSONL writer."""

import json
import re

import pytest

from hybrid_rl import envs
from hybrid_rl.envs.math_words import main, problem, write_jsonl


def test_the_same_seed_gives_the_same_problem_and_seeds_differ():
    assert problem(7) == problem(7)
    assert len({problem(s).question for s in range(100)}) > 95
    env = envs.make("MathWords-v0")
    assert env.reset(seed=7)[0] == problem(7).question


def test_the_working_adds_up_and_quantities_stay_whole():
    for seed in range(200):
        check_working(problem(seed, max_steps=4, max_quantity=50))


def check_working(p):
    start = int(re.match(r"\w+ has (\d+)", p.question).group(1))
    value = start
    for equation, after in zip(p.working, p.values):
        left, _, result = equation.partition("=")
        a, op, b = re.fullmatch(r"(\d+)([-+*/])(\d+)", left).groups()
        assert int(a) == value and int(result) == after and 0 <= after <= 999
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) / int(b)}[op]
        assert value == after  # a division splits evenly
    assert 1 <= len(p.working) <= 4 and p.question.endswith("have now?")


def test_teachers_expert_over_heuristic_over_random():
    expert, heuristic, rand = (envs.expert_stats("MathWords-v0", 100, split="train", policy=policy)
                               for policy in ("expert", "heuristic", "random"))
    assert expert["success_rate"] == 1.0
    assert 0.2 < heuristic["success_rate"] < 0.6  # right on one-step problems (a third) and a few more
    assert rand["success_rate"] < 0.1


def test_the_heuristic_stops_after_the_first_operation_and_goes_one_further_per_retry():
    env = envs.make("MathWords-v0", min_steps=3, max_attempts=3, max_episode_steps=3)
    env.reset(seed=0)
    p = env.unwrapped.problem
    replies = []
    for _ in range(3):
        replies.append(env.unwrapped.heuristic_action())
        obs, _, terminated, _, info = env.step(replies[-1])
    assert replies[0] == f"{p.working[0]}. Answer: {p.values[0]}"
    assert replies[2] == env.unwrapped.expert_action() and terminated and info["success"]


def test_answer_formats_apply_to_the_expert():
    env = envs.make("MathWords-v0", answer_format="boxed")
    env.reset(seed=3)
    reply = env.unwrapped.expert_action()
    assert reply.endswith(f"\\boxed{{{env.unwrapped.problem.answer}}}") and env.step(reply)[4]["success"]
    assert "\\boxed{}" in env.unwrapped.system_prompt


def test_the_writer_dumps_seeds_as_gsm8k_or_plain_rows(tmp_path):
    rows = [json.loads(line) for line in write_jsonl(tmp_path / "a.jsonl", 3, first_seed=5).read_text().splitlines()]
    assert [r["question"] for r in rows] == [problem(s).question for s in (5, 6, 7)]
    assert rows[0]["answer"] == "\n".join([*problem(5).working, f"#### {problem(5).answer}"])
    main([str(tmp_path / "b.jsonl"), "--n", "2", "--style", "plain"])
    plain = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert plain == [{"prompt": problem(s).question, "answer": str(problem(s).answer)} for s in (0, 1)]
    with pytest.raises(ValueError, match="'gsm8k' or 'plain'"):
        write_jsonl(tmp_path / "c.jsonl", 1, style="csv")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="1 <= min_steps <= max_steps"):
        envs.make("MathWords-v0", min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="max_attempts >= 1"):
        envs.make("MathWords-v0", max_attempts=0)
    # retries that the turn limit would cut off: refused, naming the limit to raise (silently one attempt before)
    with pytest.raises(ValueError, match=re.escape("max_attempts=3 but the turn limit max_episode_steps=1")):
        envs.make("MathWords-v0", max_attempts=3)
    with pytest.raises(ValueError, match=re.escape("e.g. Dataset-v0(max_attempts=2;max_episode_steps=2)")):
        envs.make("Dataset-v0(max_attempts=2)")

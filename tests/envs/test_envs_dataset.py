"""DatasetEnv: rows from files and folders, bad rows reported and skipped, seeds to disjoint rows, retries,
the checker and a short RL run through a file."""

import json
import warnings

import pytest

from hybrid_rl import envs
from hybrid_rl.cli import main
from hybrid_rl.envs.dataset import DatasetEnv, split_of
from hybrid_rl.envs.math_words import write_jsonl
from hybrid_rl.metrics import read_metrics

RL_SMOKE = ["init_from=", "algo.mode=sync", "algo.updates_per_batch=1", "model.preset=micro", "model.hidden_size=64",
            "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.max_turn_tokens=3",
            "rollout.max_episode_tokens=256", "rollout.pool.num_workers=0", "train.micro_batch_tokens=512",
            "eval.episodes_per_env=2", "eval.every_steps=0", "logging.backends=[jsonl]", "logging.report=false",
            "run.quiet=true", "train.steps=2"]
CAPITALS = [{"q": f"Capital of country {i}?", "a": f"City{i}"} for i in range(20)]


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def gsm8k_file(tmp_path):
    return write_jsonl(tmp_path / "math.jsonl", 50)  # GSM8K's shape: {"question", "answer": "...\n#### 34"}


def gsm8k(path, **kwargs):
    return envs.make("Dataset-v0", path=str(path), prompt_key="question", reference_format="hashes", **kwargs)


def test_a_gsm8k_style_file_plays_with_its_expert(gsm8k_file):
    env = gsm8k(gsm8k_file)
    obs, _ = env.reset(seed=0)
    row = next(r for r in map(json.loads, gsm8k_file.read_text().splitlines()) if r["question"] == obs)
    answer = row["answer"].rpartition("#### ")[2]
    assert env.unwrapped.expert_action() == f"Answer: {answer}"
    obs, reward, terminated, _, info = env.step(f"I think... Answer: {answer}")
    assert (obs, terminated, info["success"]) == ("correct", True, True)
    assert info["reward_components"] == {"correct": 1.0, "format": 0.1, "turn": -0.02} and reward == pytest.approx(1.08)


def test_a_wrong_answer_and_a_reply_without_one():
    env = envs.make("Dataset-v0", rows=CAPITALS, prompt_key="q", answer_key="a", verifier="exact")
    env.reset(seed=0)
    obs, reward, terminated, _, info = env.step("Answer: Atlantis")
    assert (obs, terminated, info["success"], info["invalid_action"]) == ("incorrect", True, False, False)
    assert info["reward_components"] == {"correct": 0.0, "format": 0.1, "turn": -0.02}
    env.reset(seed=0)
    obs, reward, terminated, _, info = env.step("City0")  # right, but not in the expected format
    assert obs == "Invalid: no answer in 'City0'; end with 'Answer: <value>'." and terminated and info["invalid_action"]
    assert reward == pytest.approx(-0.07) and not info["success"]


def test_retries_with_feedback_and_the_format_bonus_is_paid_once():
    env = envs.make("Dataset-v0", rows=CAPITALS, prompt_key="q", answer_key="a", verifier="exact",
                    max_attempts=3, max_episode_steps=3)
    env.reset(seed=1)
    right = env.unwrapped.reference
    first = env.step("Answer: Rome")
    second = env.step("Rome?")
    third = env.step(f"Answer: {right}")
    assert [s[0] for s in (first, second, third)] == [
        "incorrect, try again (2 attempts left)",
        "Invalid: no answer in 'Rome?'; end with 'Answer: <value>'. 1 attempt left", "correct"]
    assert [s[2] for s in (first, second, third)] == [False, False, True] and third[4]["success"]
    slow = sum(s[1] for s in (first, second, third))
    env.reset(seed=1)
    assert env.step(f"Answer: {right}")[1] > slow  # being right at once pays more than a retry


def test_seeds_map_to_rows_deterministically_and_splits_never_share_a_row():
    env = envs.make("Dataset-v0", rows=CAPITALS, prompt_key="q", answer_key="a")
    prompts = {split: [env.reset(seed=s)[0] for s in envs.seeds("Dataset-v0", split, 40)] for split in ("train", "val", "eval")}
    assert prompts["train"] == [env.reset(seed=s)[0] for s in range(40)]  # the same seed, the same row
    rows = {split: set(p) for split, p in prompts.items()}
    assert [len(rows[s]) for s in ("train", "val", "eval")] == [16, 2, 2]  # 10% eval, 10% val; splits cycle
    assert not rows["train"] & rows["eval"] and not rows["train"] & rows["val"] and not rows["val"] & rows["eval"]
    assert [split_of(s) for s in (None, 0, 500_000_000, 1_000_000_000)] == ["train", "train", "val", "eval"]


def test_eval_path_gives_eval_its_own_file(tmp_path, gsm8k_file):
    test_file = write_jsonl(tmp_path / "test.jsonl", 5, first_seed=10_000)
    env = gsm8k(gsm8k_file, eval_path=str(test_file))
    test_questions = {json.loads(line)["question"] for line in test_file.read_text().splitlines()}
    eval_prompts = {env.reset(seed=s)[0] for s in envs.seeds("Dataset-v0", "eval", 10)}
    assert eval_prompts == test_questions
    assert not test_questions & {env.reset(seed=s)[0] for s in range(50)}
    assert len(env.unwrapped.splits["train"]) == 45  # train and val split path alone


def test_bad_rows_are_reported_with_file_and_line_and_skipped(tmp_path):
    path = write(tmp_path / "rows.jsonl", [
        '{"prompt": "2+2?", "answer": "4"}',
        '{"prompt": "3+3?", "answer": ',                  # line 2: not JSON
        '{"question": "5+5?", "answer": "10"}',           # line 3: no prompt
        '{"prompt": "   ", "answer": "1"}',               # line 4: empty prompt
        '',                                               # blank lines are skipped silently
        '["a list"]',                                     # line 6: not an object
        '{"prompt": "6+6?", "answer": null}',             # line 7: no answer
        '{"prompt": "' + "x" * 5000 + '", "answer": "1"}',  # line 8: over an observation's length
        '{"prompt": "7+7?", "answer": 14}',               # a number is a fine answer
        '{"prompt": "8+8?", "answer": "16"}',
    ])
    with pytest.warns(RuntimeWarning) as caught:
        env = envs.make("Dataset-v0", path=str(path), eval_fraction=0, val_fraction=0)
    message = str(caught[0].message)
    assert f"{path}: skipped 6 bad row(s) of 9" in message
    for line, problem in [(2, "not JSON"), (3, "no 'prompt' (keys: question, answer)"), (4, "empty 'prompt'"),
                          (6, "a list, not an object"), (7, "empty or non-text 'answer'"), (8, "'prompt' is 5000 characters")]:
        assert f"{path}:{line}: {problem}" in message, message
    assert {env.reset(seed=s)[0] for s in range(10)} == {"2+2?", "7+7?", "8+8?"}


def test_an_answer_without_the_reference_format_is_a_bad_row(tmp_path):
    path = write(tmp_path / "gsm.jsonl", ['{"question": "q1", "answer": "so 4\\n#### 4"}',
                                          '{"question": "q2", "answer": "no marker"}'] * 2)
    with pytest.warns(RuntimeWarning, match=r"gsm.jsonl:2: 'answer' 'no marker' has no answer in the 'hashes' format"):
        DatasetEnv(path=str(path), prompt_key="question", reference_format="hashes", eval_fraction=0, val_fraction=0)


def test_a_file_with_no_usable_rows_names_the_file_and_the_fix(tmp_path, gsm8k_file):
    with pytest.raises(ValueError, match=r"math.jsonl: no usable rows \(50 bad\).*prompt_key=question, reference_format=hashes"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DatasetEnv(path=str(gsm8k_file))  # the default columns are prompt/answer
    with pytest.raises(ValueError, match="no such file or folder"):
        DatasetEnv(path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="leave no train rows"):
        DatasetEnv(rows=CAPITALS[:2], prompt_key="q", answer_key="a")


def test_local_hf_datasets_parquet_and_save_to_disk(tmp_path, gsm8k_file):
    import datasets

    data = datasets.load_dataset("json", data_files=str(gsm8k_file), split="train")
    data.to_parquet(str(tmp_path / "math.parquet"))
    data.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": data, "test": data}).save_to_disk(str(tmp_path / "dict"))
    from_file = [gsm8k(gsm8k_file).reset(seed=s)[0] for s in range(5)]
    for source in ("math.parquet", "saved", "dict/train"):
        assert [gsm8k(tmp_path / source).reset(seed=s)[0] for s in range(5)] == from_file
    with pytest.raises(ValueError, match=r"holds a DatasetDict; name one split's folder: .*dict/train"):
        gsm8k(tmp_path / "dict")


def test_a_dataset_file_passes_the_check(gsm8k_file):
    report = envs.check(f"hybrid_rl/Dataset-v0(path={gsm8k_file};prompt_key=question;reference_format=hashes)", episodes=20)
    assert report.passed, report.format()
    assert report.expert["success_rate"] == 1.0


def test_two_rl_steps_through_a_dataset_file(tmp_path, monkeypatch, capsys, gsm8k_file):
    monkeypatch.chdir(tmp_path)
    env_id = f"hybrid_rl/Dataset-v0(path={gsm8k_file};prompt_key=question;reference_format=hashes)"
    assert main(["rl", *RL_SMOKE, f"envs=[{env_id}]", "run.name=dataset"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"].endswith("step_2")
    rows = read_metrics(tmp_path / "runs" / "dataset")
    assert [r["step"] for r in rows if "rollout/reward" in r] == [1, 2]
    assert any(key.startswith("eval/success/") and "Dataset-v0" in key for key in rows[-1])


def test_prompts_outside_ascii_are_in_the_observation_space():
    rows = [{"prompt": f"Un café coûte {i} €; et deux ?", "answer": str(2 * i)} for i in range(10)]
    env = envs.make("Dataset-v0", rows=rows)
    obs, _ = env.reset(seed=0)
    assert "€" in obs and obs in env.observation_space
    assert envs.check("Dataset-v0", episodes=5, rows=rows).passed

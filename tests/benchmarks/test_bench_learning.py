"""`hybrid-rl bench learning` end to end on a tiny recipe, then its figures and table from the JSON."""

from __future__ import annotations

import json

from hybrid_rl.cli import main

TINY = ["demos.episodes_per_env=6", "sft.train.max_steps=2", "sft.eval.episodes_per_env=2", "rl.train.steps=2",
        "rl.rollout.prompts_per_step=2", "rl.rollout.samples_per_prompt=2", "rl.rollout.pool.num_workers=0",
        "rl.algo.mode=sync", "rl.algo.updates_per_batch=1", "eval.temperatures=[0.0]", "logging.backends=[jsonl]",
        "logging.report=false", "run.quiet=true"]


def test_bench_learning_records_every_policy_and_the_curve(tmp_path, monkeypatch, capsys):
    from hybrid_rl import envs
    from hybrid_rl.benchmarks import bench_learning, plot_learning

    monkeypatch.chdir(tmp_path)
    # an env's recipe change is applied (the teacher below plays without noise) and recorded
    monkeypatch.setattr(bench_learning, "RECIPE_CHANGES", {"hybrid_rl/FrozenLake-v1": ("demos.noise=0.0",)})
    out = tmp_path / "learning.json"
    assert main(["bench", "learning", "--envs", "hybrid_rl/FrozenLake-v1", "--seeds", "0", "1", "--episodes", "6",
                 "--eval-every", "1", "--curve-episodes", "3", "--json-out", str(out), "--set", *TINY]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(line)
    assert json.loads(out.read_text()) == result
    data = result["envs"]["hybrid_rl/FrozenLake-v1"]
    assert [r["seed"] for r in data["runs"]] == [0, 1]
    assert data["recipe_changes"] == ["demos.noise=0.0"]
    for run in data["runs"]:
        assert run["recipe_changes"] == ["demos.noise=0.0"]
        assert [step for step, _ in run["curve"]] == [0, 1, 2]  # SFT checkpoint, then every RL step
        assert run["expert"]["success"] == 1.0  # the optimal expert solves every held-out map
        teacher = envs.expert_stats("hybrid_rl/FrozenLake-v1", 6, split="eval", noise=0.0, policy="heuristic")
        assert run["teacher"]["success"] == teacher["success_rate"]
        for who in ("random", "teacher", "sft", "rl", "expert"):
            assert 0.0 <= run[who]["success"] <= 1.0 and run[who]["turns"] >= 1
    s = data["summary"]
    assert s["rl"]["success"]["n"] == 2
    assert abs(s["rl_minus_sft"]["mean"] - sum(r["rl"]["success"] - r["sft"]["success"] for r in data["runs"]) / 2) < 1e-12

    doc = tmp_path / "docs" / "RESULTS.md"
    doc.parent.mkdir()
    doc.write_text("# Results\n")
    assert plot_learning.main(["--json", str(out), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert plot_learning.BEGIN in text and "| FrozenLake-v1 | 2 |" in text
    assert "FrozenLake-v1: `demos.noise=0.0`" in text
    png = tmp_path / "docs" / "img" / "learning-FrozenLake-v1.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and "img/learning-FrozenLake-v1.png" in text
    assert plot_learning.main(["--json", str(out), "--doc", str(doc)]) == 0
    assert doc.read_text().count(plot_learning.BEGIN) == 1  # re-running replaces the block

    # --plain: the recipe as it is, the env's change left out (the teacher plays with the recipe's noise again)
    plain = tmp_path / "plain.json"
    assert main(["bench", "learning", "--envs", "hybrid_rl/FrozenLake-v1", "--seeds", "0", "--episodes", "6", "--plain",
                 "--curve-episodes", "3", "--json-out", str(plain), "--set", *TINY]) == 0
    run = json.loads(plain.read_text())["envs"]["hybrid_rl/FrozenLake-v1"]["runs"][0]
    noisy = envs.expert_stats("hybrid_rl/FrozenLake-v1", 6, split="eval", noise=0.1, policy="heuristic")
    assert run["recipe_changes"] == [] and run["teacher"]["success"] == noisy["success_rate"] != teacher["success_rate"]


def test_recipe_changes_match_the_env_with_or_without_its_arguments():
    from hybrid_rl.benchmarks.bench_learning import RECIPE_CHANGES, recipe_changes

    guess = list(RECIPE_CHANGES["hybrid_rl/GuessNumber-v0"])
    assert recipe_changes("hybrid_rl/GuessNumber-v0(n=100)") == guess == recipe_changes("hybrid_rl/GuessNumber-v0")
    assert recipe_changes("hybrid_rl/FrozenLake-v1") == [] and recipe_changes("hybrid_rl/Nim-v0") == []  # Nim: untuned

"""`hybrid-rl bench learning` end to end on a tiny recipe, then its figures and table from the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrid_rl.cli import main

ROOT = Path(__file__).resolve().parents[2]

TINY = ["demos.episodes_per_env=6", "sft.train.max_steps=2", "sft.eval.episodes_per_env=2", "rl.train.steps=2",
        "rl.rollout.prompts_per_step=2", "rl.rollout.samples_per_prompt=2", "rl.rollout.pool.num_workers=0",
        "rl.algo.mode=sync", "rl.algo.updates_per_batch=1", "eval.temperatures=[0.0]", "logging.backends=[jsonl]",
        "logging.report=false", "run.quiet=true"]


def test_bench_learning_records_every_policy_and_the_curve(tmp_path, monkeypatch, capsys):
    import pytest

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
    assert result["bench_envs"] == bench_learning.DEFAULT_ENVS  # the table splits by what the bench played by default
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
    # a second table (e.g. an earlier recipe's JSON) in its own block, with its own images; the first stays
    assert plot_learning.main(["--json", str(out), "--doc", str(doc), "--block", "learning-previous"]) == 0
    text2 = doc.read_text()
    begin, end = plot_learning.markers("learning-previous")
    assert text2.count(plot_learning.BEGIN) == 1 and text2.count(begin) == 1 and end in text2
    assert text2[text2.index(plot_learning.BEGIN):text2.index(plot_learning.END)] == text[text.index(plot_learning.BEGIN):text.index(plot_learning.END)]
    assert (tmp_path / "docs" / "img" / "learning-previous-FrozenLake-v1.png").exists()
    assert "img/learning-previous-FrozenLake-v1.png" in text2[text2.index(begin):]
    with pytest.raises(SystemExit):
        plot_learning.main(["--json", str(out), "--doc", str(doc), "--block", "bad name"])
    assert "letters, digits" in capsys.readouterr().err

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
    assert recipe_changes("hybrid_rl/FrozenLake-v1") == [] and recipe_changes("hybrid_rl/Nim-v0") == []  # Nim: its default teacher


def test_merge_replaces_only_the_envs_run_and_refuses_another_recipe(tmp_path, monkeypatch, capsys):
    """--merge: the environments run now replace their entries, the others stay as measured (their runs, commits,
    order); a JSON of another recipe or episode count is refused before any run, naming the fix."""
    import pytest

    from hybrid_rl.benchmarks import bench_learning

    def fake_run(env_id, seed, args):
        return {"env": env_id, "seed": seed, "wall_s": 10.0, "commit": "new", "curve": [[0, 0.5]],
                **{who: {"success": 0.25 * (who == "rl") + 0.5, "turns": 4.0} for who in bench_learning.POLICIES}}

    monkeypatch.setattr(bench_learning, "run_one", fake_run)
    out = tmp_path / "learning.json"
    first = ["bench", "learning", "--json-out", str(out), "--seeds", "0", "1", "--envs"]
    assert main([*first, "hybrid_rl/FrozenLake-v1", "hybrid_rl/Nim-v0"]) == 0
    before = json.loads(out.read_text())
    before["envs"]["hybrid_rl/FrozenLake-v1"]["runs"][0]["commit"] = "old"
    out.write_text(json.dumps(before))

    assert main([*first, "hybrid_rl/Snake-v0", "hybrid_rl/Nim-v0", "--merge"]) == 0
    after = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == after
    assert list(after["envs"]) == ["hybrid_rl/FrozenLake-v1", "hybrid_rl/Nim-v0", "hybrid_rl/Snake-v0"]
    assert after["envs"]["hybrid_rl/FrozenLake-v1"] == before["envs"]["hybrid_rl/FrozenLake-v1"]  # kept as it was
    assert [r["seed"] for r in after["envs"]["hybrid_rl/Snake-v0"]["runs"]] == [0, 1]
    assert after["envs"]["hybrid_rl/Nim-v0"]["summary"]["rl_minus_sft"]["mean"] == 0.25 and after["complete"]

    for bad, why in ((["--episodes", "50"], "episodes is 100"), (["--set", "rl.train.steps=9"], "overrides is []")):
        with pytest.raises(SystemExit):
            main([*first, "hybrid_rl/Nim-v0", "--merge", *bad])
        err = capsys.readouterr().err
        assert why in err and "another --json-out" in err
    assert json.loads(out.read_text()) == after  # nothing written

    # the same recipe file name with other content (a recipe changed since the JSON was measured) is refused too
    recipe = tmp_path / "quickstart.yaml"
    recipe.write_text("rl:\n  train: {steps: 240}\n")
    mine = ["bench", "learning", "--json-out", str(tmp_path / "mine.json"), "--config", str(recipe), "--seeds", "0", "--envs"]
    assert main([*mine, "hybrid_rl/FrozenLake-v1"]) == 0
    recipe.write_text("rl:\n  train: {steps: 320}\n")
    with pytest.raises(SystemExit):
        main([*mine, "hybrid_rl/Nim-v0", "--merge"])
    err = capsys.readouterr().err
    assert "recipe_sha256" in err and "content changed" in err and "another --json-out" in err
    assert list(json.loads((tmp_path / "mine.json").read_text())["envs"]) == ["hybrid_rl/FrozenLake-v1"]
    with pytest.raises(SystemExit):
        main(["bench", "learning", "--json-out", str(tmp_path / "none.json"), "--merge"])
    assert "does not exist" in capsys.readouterr().err


def test_a_bare_env_id_merges_into_its_namespaced_entry_and_a_bad_one_is_refused(tmp_path, monkeypatch, capsys):
    """`--envs FrozenLake-v1 --merge` replaces the `hybrid_rl/FrozenLake-v1` entry (it used to file a second one
    beside it), a bare GuessNumber id gets its recipe change, and an unknown id or malformed arguments stop
    the benchmark before any run, naming the problem."""
    import pytest

    from hybrid_rl.benchmarks import bench_learning

    seen = []

    def fake_run(env_id, seed, args):
        seen.append(env_id)
        return {"env": env_id, "seed": seed, "wall_s": 10.0, "commit": "new", "curve": [[0, 0.5]],
                "recipe_changes": bench_learning.recipe_changes(env_id),
                **{who: {"success": 0.5, "turns": 4.0} for who in bench_learning.POLICIES}}

    monkeypatch.setattr(bench_learning, "run_one", fake_run)
    out = tmp_path / "learning.json"
    first = ["bench", "learning", "--json-out", str(out), "--seeds", "0", "--envs"]
    assert main([*first, "hybrid_rl/FrozenLake-v1", "hybrid_rl/Nim-v0"]) == 0
    assert main([*first, "FrozenLake-v1", "GuessNumber-v0(n=100)", "--merge"]) == 0
    after = json.loads(out.read_text())
    assert list(after["envs"]) == ["hybrid_rl/FrozenLake-v1", "hybrid_rl/Nim-v0", "hybrid_rl/GuessNumber-v0(n=100)"]
    assert after["envs"]["hybrid_rl/GuessNumber-v0(n=100)"]["recipe_changes"] == list(
        bench_learning.RECIPE_CHANGES["hybrid_rl/GuessNumber-v0"])
    assert seen[-2:] == ["hybrid_rl/FrozenLake-v1", "hybrid_rl/GuessNumber-v0(n=100)"]

    capsys.readouterr()
    for bad, why in (("NoSuchEnv-v9", "NoSuchEnv"), ("GuessNumber-v0(n=100", "closing ')'")):
        with pytest.raises(SystemExit):
            main([*first, bad, "--merge"])
        err = capsys.readouterr().err
        assert "--envs" in err and why in err
    assert json.loads(out.read_text()) == after and len(seen) == 4  # nothing run, nothing written


@pytest.mark.slow
def test_a_bench_seed_is_what_a_fresh_pipeline_run_of_it_gives_slow(tmp_path, monkeypatch, capsys):
    """Seed 1 played after seed 0 trains exactly as `hybrid-rl pipeline ... run.seed=1` run alone: in the bench (a
    process per run) and in one Python process too. Before the RL stage gave the process its thread count back, a
    pipeline run after another one in a process trained its SFT on the RL stage's one thread, and the two parted
    at float level by SFT step 20."""
    import subprocess
    import sys

    from hybrid_rl.metrics import read_metrics

    monkeypatch.chdir(tmp_path)
    steps = ["sft.train.max_steps=40", "sft.eval.episodes_per_env=2", "rl.train.steps=1", "rl.rollout.pool.num_workers=0",
             "rl.algo.mode=sync", "eval.temperatures=[0.0]", "logging.backends=[jsonl]", "logging.report=false",
             "run.quiet=true", "eval.split=val"]
    assert main(["bench", "learning", "--envs", "hybrid_rl/FrozenLake-v1", "--seeds", "0", "1", "--episodes", "4",
                 "--curve-episodes", "2", "--json-out", str(tmp_path / "l.json"), "--set", *steps]) == 0
    from hybrid_rl.config import CONFIG_DIR

    config = str(CONFIG_DIR / "quickstart.yaml")
    alone = subprocess.run([sys.executable, "-m", "hybrid_rl.cli", "pipeline", config, "envs=[hybrid_rl/FrozenLake-v1]",
                            "run.seed=1", "run.name=alone", *steps], capture_output=True, text=True, timeout=900)
    assert alone.returncode == 0, alone.stdout[-2000:] + alone.stderr[-2000:]

    def losses(run):
        return [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path / "runs" / run / "sft") if "train/loss" in r]

    in_bench = losses("learning/FrozenLake-v1-s1")
    assert len(in_bench) >= 4 and in_bench == losses("alone")  # to the last bit, step 20 and on included
    for seed in (0, 1):  # both in this process, one after the other
        assert main(["pipeline", config, "envs=[hybrid_rl/FrozenLake-v1]", f"run.seed={seed}", f"run.name=here{seed}",
                     *steps]) == 0
    assert losses("here1") == losses("alone")



def test_the_table_names_each_runs_commit_with_its_dirty_mark(tmp_path):
    """Runs merged from several commits are listed per env, and a run made from a tree with changes says so."""
    from hybrid_rl.benchmarks import plot_learning

    result = json.loads((plot_learning.ROOT / "benchmarks" / "results" / "learning.json").read_text())
    env_id = next(iter(result["envs"]))
    runs = result["envs"][env_id]["runs"]
    runs[0]["commit"], runs[1]["commit"] = "a" * 40 + "-dirty", "b" * 40
    result["commit"] = "b" * 40
    text = plot_learning.render(result, tmp_path / "img", tmp_path)
    assert f"commit `{'b' * 12}`" in text
    assert f"{'a' * 7}-dirty, {'b' * 7}" in text.split("Commit of each env's runs:")[1]


def test_learning_table_puts_the_bench_envs_first_and_further_envs_apart():
    """The bench's own envs (DEFAULT_ENVS, in its order) and envs run with --envs are two tables, so the env set the
    bench is judged on is the one it runs by default; the turns table and the images follow the same order."""
    from hybrid_rl.benchmarks import bench_learning, plot_learning

    def env(rl: float) -> dict:
        stat = {"mean": rl, "se": 0.01, "n": 3}
        summary = {w: {"success": stat, "turns": {"mean": 5.0, "se": 0.0, "n": 3}} for w in plot_learning.NAMES}
        return {"summary": {**summary, "rl_minus_sft": stat, "rl_minus_teacher": stat, "wall_s": stat}}

    further = "hybrid_rl/Buttons-v0"
    assert further not in bench_learning.DEFAULT_ENVS
    result = {"bench_envs": bench_learning.DEFAULT_ENVS,
              "envs": {further: env(0.1), **{e: env(0.5) for e in reversed(bench_learning.DEFAULT_ENVS)}}}
    lines = plot_learning.table(result)
    rows = [line.split(" | ")[0].lstrip("| ") for line in lines if line.startswith("| ") and " | 3 | " in line]
    assert rows == [e.replace("hybrid_rl/", "") for e in bench_learning.DEFAULT_ENVS] + ["Buttons-v0"]
    heads = [line for line in lines if line.endswith(":") and "environments" in line]
    assert len(heads) == 2 and "default" in heads[0] and lines.index(heads[1]) > max(
        i for i, line in enumerate(lines) if line.startswith("| GuessNumber-v0(n=100) | 3 |"))
    turns = lines[lines.index("Mean turns (greedy, held out):"):]
    assert [line.split(" | ")[0].lstrip("| ") for line in turns[4:]] == rows
    only_bench = {"bench_envs": bench_learning.DEFAULT_ENVS, "envs": {e: env(0.5) for e in bench_learning.DEFAULT_ENVS}}
    assert not any(line.endswith(":") and "environments" in line for line in plot_learning.table(only_bench))
    # a JSON from before bench_envs was recorded (e.g. learning-previous.json): one table in its own order, not split
    # by today's defaults
    old = {"envs": result["envs"]}
    lines = plot_learning.table(old)
    assert not any(line.endswith(":") and "environments" in line for line in lines)
    assert [line.split(" | ")[0].lstrip("| ") for line in lines if " | 3 | " in line][0] == "Buttons-v0"


def test_paired_episodes_statistics_match_hand_counts():
    """scripts/paired_episodes.py: per seed, RL - other averaged over the runs that played it; the standard error
    over seeds, not over (run, seed) episodes (the runs share their seeds); the exact two-sided sign test on the
    seeds (checked by hand: 9 seeds ahead against 1 behind gives p = 22/1024)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("paired_episodes", ROOT / "scripts" / "paired_episodes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    by_seed = {s: [(False, True), (False, True)] for s in range(9)}  # (other, rl) in each of 2 runs: RL ahead
    by_seed[9] = [(True, False), (True, True)]  # RL behind on average
    by_seed.update({s: [(True, True), (False, False)] for s in range(10, 20)})  # tied
    out = mod.paired(by_seed)
    diffs = [1.0] * 9 + [-0.5] + [0.0] * 10
    mean = sum(diffs) / 20
    assert out["diff"] == round(mean, 4) and out["seeds"] == 20
    assert out["seeds_rl_ahead"] == 9 and out["seeds_other_ahead"] == 1
    assert out["sign_test_p"] == float(f"{22 / 1024:.3g}")
    assert out["se_over_seeds"] == round((sum((d - mean) ** 2 for d in diffs) / 19 / 20) ** 0.5, 4)
    assert out["episodes_only_rl_wins"] == 18 and out["episodes_only_other_wins"] == 1
    # the same outcome repeated by three runs is one seed's evidence, not three: the test does not get stronger
    once = mod.paired({s: runs[:1] for s, runs in by_seed.items()})
    thrice = mod.paired({s: runs[:1] * 3 for s, runs in by_seed.items()})
    assert thrice["sign_test_p"] == once["sign_test_p"] and thrice["se_over_seeds"] == once["se_over_seeds"]
    assert mod.paired({s: [(True, True)] for s in range(5)})["sign_test_p"] == 1.0  # no seed differs

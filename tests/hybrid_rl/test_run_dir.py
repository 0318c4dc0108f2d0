"""run.overwrite replaces a previous run's outputs (never mixes them with the new run's) and nothing else."""

import json

import pytest

from hybrid_rl.metrics import read_metrics
from hybrid_rl.run import RunConfig, make_run_dir


def _previous_run(run_dir):
    (run_dir / "step_80").mkdir(parents=True)
    (run_dir / "step_80" / "model.safetensors").write_bytes(b"old")
    (run_dir / ".step_90.tmp-123").mkdir()
    (run_dir / "tensorboard").mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 80, "eval/success": 0.5}) + "\n")
    (run_dir / "samples.jsonl").write_text("{}\n")
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "step_notes").mkdir()


def test_a_fresh_run_refuses_a_used_directory(tmp_path):
    _previous_run(tmp_path / "r")
    with pytest.raises(FileExistsError, match="run.overwrite=true"):
        make_run_dir(RunConfig(name="r", output_dir=str(tmp_path)), "rl", {"a": 1})
    assert (tmp_path / "r" / "metrics.jsonl").exists()  # nothing lost


def test_overwrite_replaces_the_previous_run_outputs_only(tmp_path):
    _previous_run(tmp_path / "r")
    run_dir = make_run_dir(RunConfig(name="r", output_dir=str(tmp_path), overwrite=True), "rl", {"a": 1})
    left = sorted(p.name for p in run_dir.iterdir())
    assert left == ["config.yaml", "notes.txt", "step_notes"]  # the user's own files stay
    assert read_metrics(run_dir) == []  # the new run's metrics start empty: no stale curve points


def test_resume_keeps_the_previous_run(tmp_path):
    _previous_run(tmp_path / "r")
    run_dir = make_run_dir(RunConfig(name="r", output_dir=str(tmp_path), overwrite=True), "rl", {"a": 1}, resume=True)
    assert (run_dir / "step_80" / "model.safetensors").read_bytes() == b"old"
    assert [r["step"] for r in read_metrics(run_dir)] == [80]


def test_the_recorded_commit_is_dirty_for_code_changes_not_for_written_results(tmp_path):
    """A benchmark that records its first run writes benchmarks/results/*.json (and docs pages): its later runs
    must not be marked '-dirty' by its own output, while a change of the code is."""
    import subprocess

    from hybrid_rl.run import git_commit

    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True)  # noqa: E731
    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    for name in ("pkg/code.py", "benchmarks/results/learning.json", "docs/RESULTS.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("0\n")
    git("add", "-A")
    git("commit", "-qm", "x")
    sha = git("rev-parse", "HEAD").stdout.strip()
    pkg = tmp_path / "pkg"
    assert git_commit(pkg) == sha
    (tmp_path / "benchmarks/results/learning.json").write_text("1\n")
    (tmp_path / "docs/RESULTS.md").write_text("1\n")
    assert git_commit(pkg) == sha
    (tmp_path / "pkg/code.py").write_text("1\n")
    assert git_commit(pkg) == f"{sha}-dirty"

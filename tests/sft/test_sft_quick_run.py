"""The quick recipe end to end (slow): `hybrid-rl sft configs/sft_quick.yaml` learns both tasks."""

from __future__ import annotations

import pytest

from hybrid_rl.cli import main as cli_main
from hybrid_rl.metrics import read_metrics
from hybrid_rl.sft.results import markdown, summarize_run

ENVS = ("GuessNumber-v0", "FrozenLake-v1")


@pytest.mark.slow
def test_quick_recipe_slow_learns_both_tasks_far_above_random_init(tmp_path):
    assert cli_main(["sft", "configs/sft_quick.yaml", f"run.output_dir={tmp_path}", "logging.backends=[jsonl]",
                     "logging.report=false", "run.quiet=true"]) == 0
    run = tmp_path / "sft-quick"
    evals = [r for r in read_metrics(run) if "eval/success" in r]
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and end["step"] == 300
    for env in ENVS:
        assert start[f"eval/success/{env}"] <= 0.1, env  # the random-init model
        assert end[f"eval/success/{env}"] >= start[f"eval/success/{env}"] + 0.5, env
    assert end["eval/loss"] < 0.2 * start["eval/loss"]
    assert (run / "step_300" / "model.safetensors").is_file() and (run / "step_300" / "trainer_state.pt").is_file()
    text = markdown(summarize_run(run))
    assert "| 0 |" in text and "| 300 |" in text

"""A short `hybrid-rl sft` with wandb offline and TensorBoard: history and config read back from their own files."""

from __future__ import annotations

import pytest

from hybrid_rl.metrics import read_metrics, read_tensorboard_scalars, read_wandb_offline_run
from sft_testlib import run_sft


def test_sft_run_reaches_wandb_offline_and_tensorboard(tmp_path, chat_jsonl, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = run_sft(tmp_path, "dash", "train.max_steps=3", "train.lr=2e-3", "run.tags=[sft,e2e]",
                  "data.envs=[{env_id: hybrid_rl/GuessNumber-v0, episodes: 4}]", f"data.jsonl_paths=[{chat_jsonl}]",
                  "eval.episodes_per_env=1", "eval.max_turn_tokens=4", "logging.backends=[jsonl,tensorboard,wandb]",
                  "logging.wandb_mode=offline")
    rows = read_metrics(run)
    truth = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    success = [r["eval/success/GuessNumber-v0"] for r in rows if "eval/success/GuessNumber-v0" in r]
    assert sorted(truth) == [1, 2, 3] and len(success) == 1  # eval once, at the end

    wb = read_wandb_offline_run(run)
    assert wb.name == "dash" and set(wb.tags) == {"sft", "e2e"}
    assert wb.config["train"]["lr"] == pytest.approx(2e-3) and wb.config["model"]["preset"] == "micro"
    history = {h["_step"]: h for h in wb.history}
    for step, loss in truth.items():
        assert history[step]["train/loss"] == pytest.approx(loss, rel=1e-6)
    assert history[3]["eval/success/GuessNumber-v0"] == pytest.approx(success[0])
    assert any(k.startswith("moe/load_max/layer") for k in history[1])
    assert history[0]["train/samples/GuessNumber-v0"] == 4 and history[0]["train/skipped_samples"] == 0

    tb = read_tensorboard_scalars(run)
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3]
    for (step, value) in tb["train/loss"]:
        assert value == pytest.approx(truth[step], rel=1e-6)
    assert "train/lr" in tb and "perf/tokens_per_s" in tb and "eval/loss" in tb

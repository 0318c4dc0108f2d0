"""`hybrid-rl bench grpo` runs our side end to end (the config keys it sets must stay valid)."""

from __future__ import annotations

import json

from hybrid_rl.cli import main


def test_bench_grpo_times_our_loop(capsys):
    import torch

    before = torch.get_num_threads()
    assert main(["bench", "grpo", "--steps", "2", "--skip-trl", "--threads", str(before + 1)]) == 0
    assert torch.get_num_threads() == before  # the caller's thread count back (these tests run in the suite's process)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "grpo" and len(result["ours_steps_s"]) == 2 and result["ours_s_per_step"] > 0
    import transformers
    import trl

    # the figures say what they were measured with (TRL's speed moves with its and transformers' releases)
    assert result["transformers"] == transformers.__version__ and result["trl"] == trl.__version__ and result["torch"]


def test_bench_grpo_times_each_precision(capsys):
    assert main(["bench", "grpo", "--steps", "2", "--skip-trl", "--threads", "1", "--dtypes", "fp32", "bf16"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["dtype"] == "fp32" and set(result["other_dtypes"]) == {"bf16"}
    bf16 = result["other_dtypes"]["bf16"]
    assert len(bf16["ours_steps_s"]) == 2 and bf16["ours_s_per_step"] > 0 and "speedup" not in bf16
    assert all(p["tokens"] > 0 for p in bf16["ours_phases"])


def test_bench_grpo_rounds_alternate_the_sides_and_take_the_median_ratio(monkeypatch, capsys):
    """--rounds: ours, TRL, ours, TRL, ...; each round's warm-up step left out; the ratio is the median of the
    rounds' ratios (not the ratio of the pooled medians), the seconds per step the pooled medians."""
    from hybrid_rl.benchmarks import bench_grpo

    ours_rounds = iter([[9.0, 1.0, 1.0], [9.0, 2.0, 2.0], [9.0, 1.0, 1.0]])
    trl_rounds = iter([[9.0, 4.0, 4.0], [9.0, 4.0, 4.0], [9.0, 3.0, 3.0]])  # round ratios 4, 2, 3
    order = []

    def ours(steps, threads, dtype):
        order.append("ours")
        times = next(ours_rounds)
        return times, [{"rollout_s": t / 2, "update_s": t / 2, "tokens": 10} for t in times]

    def trl(steps, threads, workdir, dtype):
        order.append("trl")
        return next(trl_rounds)

    monkeypatch.setattr(bench_grpo, "bench_ours", ours)
    monkeypatch.setattr(bench_grpo, "bench_trl", trl)
    assert bench_grpo.main(["--steps", "3", "--rounds", "3", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert order == ["ours", "trl"] * 3
    assert result["rounds"] == 3 and result["round_speedups"] == [4.0, 2.0, 3.0] and result["speedup"] == 3.0
    assert result["ours_s_per_step"] == 1.0 and result["trl_s_per_step"] == 4.0  # pooled, warm-ups left out
    assert len(result["ours_steps_s"]) == len(result["ours_phases"]) == len(result["trl_steps_s"]) == 9


def test_bench_grpo_rejects_no_rounds(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["bench", "grpo", "--rounds", "0", "--skip-trl"])
    assert "--rounds must be >= 1" in capsys.readouterr().err


def test_trl_runs_without_gradient_checkpointing(monkeypatch, tmp_path):
    """TRL's GRPOConfig turns gradient checkpointing on by default, which recomputes the forward in the backward;
    our update keeps its activations, so the TRL side turns it off: both sides do the same arithmetic."""
    import pytest
    import trl

    from hybrid_rl.benchmarks import bench_grpo

    seen = {}

    class Stop(Exception):
        pass

    def trainer(*, args, **kwargs):
        seen["args"] = args
        raise Stop

    monkeypatch.setattr(trl, "GRPOTrainer", trainer)
    with pytest.raises(Stop):
        bench_grpo.bench_trl(2, 1, str(tmp_path))
    assert seen["args"].gradient_checkpointing is False
    assert trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True).gradient_checkpointing  # what the default would do

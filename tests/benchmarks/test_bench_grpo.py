"""`hybrid-rl bench grpo` runs our side end to end (the config keys it sets must stay valid)."""

from __future__ import annotations

import json

from hybrid_rl.cli import main


def test_bench_grpo_times_our_loop(capsys):
    assert main(["bench", "grpo", "--steps", "2", "--skip-trl", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "grpo" and len(result["ours_steps_s"]) == 2 and result["ours_s_per_step"] > 0


def test_bench_grpo_times_each_precision(capsys):
    assert main(["bench", "grpo", "--steps", "2", "--skip-trl", "--threads", "1", "--dtypes", "fp32", "bf16"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["dtype"] == "fp32" and set(result["other_dtypes"]) == {"bf16"}
    bf16 = result["other_dtypes"]["bf16"]
    assert len(bf16["ours_steps_s"]) == 2 and bf16["ours_s_per_step"] > 0 and "speedup" not in bf16
    assert all(p["tokens"] > 0 for p in bf16["ours_phases"])

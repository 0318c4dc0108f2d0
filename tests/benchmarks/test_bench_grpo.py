"""`hybrid-rl bench grpo` runs our side end to end (the config keys it sets must stay valid)."""

from __future__ import annotations

import json

from hybrid_rl.cli import main


def test_bench_grpo_times_our_loop(capsys):
    assert main(["bench", "grpo", "--steps", "2", "--skip-trl", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "grpo" and len(result["ours_steps_s"]) == 2 and result["ours_s_per_step"] > 0

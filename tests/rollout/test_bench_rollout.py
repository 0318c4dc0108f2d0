"""Smoke test of `hybrid-rl bench rollout` at toy sizes (the JSON shape, and that both modes agree)."""

import json

import pytest

pytest.importorskip("hybrid_rl.model.hybrid")


def test_bench_rollout_prints_one_json_line(capsys):
    from hybrid_rl.benchmarks.bench_rollout import main

    assert main(["--preset", "micro", "--groups", "1", "--group-size", "2", "--turns", "1", "2", "--obs-lens", "16",
                 "--max-turn-tokens", "3", "--repeats", "1", "--no-ray"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["throughput"]["episodes"] == 2 and result["throughput"]["episodes_per_s"] > 0
    rows = result["extension_vs_reprefill"]
    assert [r["turns"] for r in rows] == [1, 2] and all(r["same_tokens"] for r in rows)
    # re-prefilling pushes more tokens through the model than extending, more so with more turns
    assert rows[1]["reprefill_model_tokens"] - rows[1]["extend_model_tokens"] > \
        rows[0]["reprefill_model_tokens"] - rows[0]["extend_model_tokens"]

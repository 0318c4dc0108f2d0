"""Smoke test of `hybrid-rl bench rollout` at toy sizes (the JSON shape, and that both modes agree; a slow
environment plays the same tokens as an instant one)."""

import json

import pytest

pytest.importorskip("hybrid_rl.model.hybrid")


def test_bench_rollout_prints_one_json_line(capsys):
    from hybrid_rl.benchmarks.bench_rollout import main

    assert main(["--preset", "micro", "--groups", "1", "--group-size", "2", "--turns", "1", "2", "--obs-lens", "16",
                 "--max-turn-tokens", "3", "--repeats", "2", "--warmup-rounds", "1", "--no-ray", "--env-delay", "0.01", "--batch", "2",
                 "--raw-new-tokens", "2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["cpu"] and result["commit"]  # where it ran: the figures follow the CPU
    throughput = result["throughput"]
    assert throughput["episodes"] == 2 and throughput["episodes_per_s"] > 0 and throughput["warmup_rounds"] == 1
    assert throughput["raw_decode"]["batch"] == 2 and throughput["raw_decode"]["tokens_per_s"] > 0
    # the median run over the median raw loop, and the headline: the median of the rounds' paired ratios
    assert throughput["engine_vs_median_raw_decode"] == pytest.approx(
        throughput["generated_tokens_per_s"] / throughput["raw_decode"]["tokens_per_s"])
    rounds = throughput["engine_vs_raw_decode_rounds"]
    assert len(rounds) == 2 and all(x > 0 for x in rounds)
    assert throughput["engine_vs_raw_decode"] == pytest.approx(sum(rounds) / 2, abs=1e-3)
    split, stats = throughput["time_split"], throughput["engine_stats"]
    # the model's calls happen inside the run: decode + extend + the engine's own work add up to its seconds
    assert split["decode_s"] > 0 and split["extend_s"] > 0 and split["engine_own_s"] >= 0
    assert split["decode_s"] + split["extend_s"] + split["engine_own_s"] == pytest.approx(throughput["seconds"])
    assert split["decode_share"] + split["extend_share"] + split["engine_own_share"] == pytest.approx(1.0)
    # every token the model was fed went through exactly one decode step or one extension
    assert stats["decode_tokens"] + split["extend_tokens"] == stats["fed_tokens"] + stats["prefill_tokens"]
    assert split["engine_vs_raw_if_no_own_work"] >= throughput["engine_vs_median_raw_decode"]
    slow = result["slow_env"]
    assert slow["episodes"] == 2 and slow["step_delay_s"] == 0.01 and slow["same_tokens"]
    rows = result["extension_vs_reprefill"]
    assert [r["turns"] for r in rows] == [1, 2] and all(r["same_tokens"] for r in rows)
    # re-prefilling pushes more tokens through the model than extending, more so with more turns
    assert rows[1]["reprefill_model_tokens"] - rows[1]["extend_model_tokens"] > \
        rows[0]["reprefill_model_tokens"] - rows[0]["extend_model_tokens"]

"""The memory table against an independent hand computation from the published shapes."""

import json

import pytest

from hybrid_rl.benchmarks.bench_memory import all_attention_twin, main, measure, parse_context
from hybrid_rl.model.config import HybridConfig

GiB, MiB = 1024**3, 1024**2


def hand(preset: str, tokens: int) -> dict:
    """Written out from docs/NEMOTRON3.md's table, not from HybridConfig fields."""
    if preset == "nemotron3-nano":
        n_attn, n_mamba, heads, state, groups, layers = 6, 23, 64, 128, 8, 52
    else:
        n_attn, n_mamba, heads, state, groups, layers = 8, 40, 128, 128, 8, 88
    head_dim_mamba, kv_heads, head_dim, kernel = 64, 2, 128, 4
    kv_per_token = n_attn * 2 * kv_heads * head_dim * 2  # K and V, bf16
    ssm = n_mamba * heads * head_dim_mamba * state * 4  # fp32
    conv = n_mamba * (kernel - 1) * (heads * head_dim_mamba + 2 * groups * state) * 2  # bf16
    return {"kv": kv_per_token * tokens, "ssm": ssm, "conv": conv,
            "dense": layers * 2 * kv_heads * head_dim * 2 * tokens}


def test_layer_counts_match_published_patterns():
    for preset, (attn, mamba, moe) in {"nemotron3-nano": (6, 23, 23), "nemotron3-super": (8, 40, 40)}.items():
        p = HybridConfig.from_preset(preset).layer_pattern
        assert (p.count("*"), p.count("M"), p.count("E")) == (attn, mamba, moe)


def test_contexts():
    assert [parse_context(c) for c in ("8K", "128k", "1M", "4096")] == [8192, 131072, 1_000_000, 4096]
    with pytest.raises(ValueError, match="8K, 128K"):
        parse_context("lots")


@pytest.mark.parametrize("preset", ["nemotron3-nano", "nemotron3-super"])
def test_numbers_match_hand_computation(preset):
    rows = measure([preset], ["8K", "128K", "1M"])["rows"]
    for row in rows:
        want = hand(preset, row["tokens"])
        assert (row["kv_bytes"], row["ssm_bytes"], row["conv_bytes"]) == (want["kv"], want["ssm"], want["conv"])
        assert row["total_bytes"] == want["kv"] + want["ssm"] + want["conv"]
        assert row["all_attention_total_bytes"] == want["dense"]


def test_published_figures():
    rows = {(r["preset"], r["context"]): r for r in measure(["nemotron3-nano", "nemotron3-super"], ["1M"])["rows"]}
    nano, sup = rows["nemotron3-nano", "1M"], rows["nemotron3-super", "1M"]
    assert sup["kv_bytes"] / 1_000_000 == 8 * 1024  # 8 KiB per token
    assert nano["kv_bytes"] / 1_000_000 == 6 * 1024  # 6 KiB per token
    assert round(sup["kv_bytes"] / GiB, 1) == 7.6  # "7.6 GiB at 1M tokens"
    assert round(sup["ssm_bytes"] / MiB) == 160 and round(nano["ssm_bytes"] / MiB) == 46
    assert sup["ratio_all_attention_over_hybrid"] > 10  # an order of magnitude


def test_twin_keeps_width_and_depth():
    cfg = HybridConfig.from_preset("nemotron3-super")
    twin = all_attention_twin(cfg)
    assert twin.layer_pattern == "*" * 88
    assert (twin.hidden_size, twin.num_attention_heads, twin.num_key_value_heads, twin.head_dim) == (4096, 32, 2, 128)


def test_cli_prints_table_and_json(capsys, tmp_path):
    out_file = tmp_path / "mem.json"
    assert main(["--presets", "nemotron3-super", "--contexts", "1M", "--json-out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "nemotron3-super" in out and "1,000,000" in out
    json_lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(json_lines) == 1  # what benchmarks.record reads
    doc = json.loads(json_lines[0])
    assert doc == json.loads(out_file.read_text()) and len(doc["rows"]) == 1


def test_bench_dispatcher(capsys):
    from hybrid_rl.cli import main as cli_main

    assert cli_main(["bench", "memory", "--presets", "nemotron3-nano", "--contexts", "8K"]) == 0
    assert "nemotron3-nano" in capsys.readouterr().out

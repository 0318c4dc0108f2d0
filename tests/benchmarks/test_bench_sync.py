"""``hybrid-rl bench sync`` on the ``micro`` preset: the JSON's shape, its byte counts, and its section of the page."""

import json
import math

import pytest
import torch

from hybrid_rl.benchmarks.bench_sync import MODES, main
from hybrid_rl.benchmarks.record import render

MiB = 1024 ** 2


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    pytest.importorskip("ray")
    out = tmp_path_factory.mktemp("sync") / "sync.json"
    assert main(["--presets", "micro", "--repeats", "1", "--bucket-mb", "1", "--default-store-preset", "",
                 "--json-out", str(out)]) == 0
    return json.loads(out.read_text())


def state_bytes(preset: str) -> tuple[int, int, int]:
    """Parameters, fp32 bytes and bf16 bytes (floating tensors halved) of the preset's state dict."""
    from hybrid_rl.model import HybridConfig, HybridLM

    with torch.device("meta"):
        state = HybridLM(HybridConfig.from_preset(preset)).state_dict()
    fp32 = sum(v.numel() * v.element_size() for v in state.values())
    bf16 = sum(v.numel() * (2 if v.is_floating_point() else v.element_size()) for v in state.values())
    return sum(v.numel() for v in state.values()), fp32, bf16


def test_sync_json_has_every_mode_per_preset_with_the_right_bytes(result):
    assert result["benchmark"] == "sync" and [p["preset"] for p in result["presets"]] == ["micro"]
    assert result["cpu"] and result["commit"]  # where it ran: the figures follow the CPU
    for p in result["presets"]:
        params, fp32, bf16 = state_bytes(p["preset"])
        assert p["params"] == params
        assert p["baseline"]["bytes"] == p["fp32_bucket"]["bytes"] == fp32
        assert p["bf16_bucket"]["bytes"] == bf16 == fp32 // 2  # every tensor of the model is floating
        assert p["fp32_bucket"]["buckets"] == math.ceil(fp32 / MiB)
        assert p["bf16_bucket"]["buckets"] == math.ceil(bf16 / MiB)
        assert all(p[mode]["seconds"] > 0 and len(p[mode]["seconds_all"]) == 1 for mode in MODES)
        assert p["baseline_over_bf16_bucket"] == pytest.approx(p["baseline"]["seconds"] / p["bf16_bucket"]["seconds"])
    assert result["presets"][0]["fp32_bucket"]["buckets"] == 4  # micro's 3.4 MiB in 1 MiB buckets


def test_sync_section_of_the_page(result, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "sync.json").write_text(json.dumps(result) + "\n")
    page = render(results, tmp_path / "docs")
    micro = result["presets"][0]
    assert "## Weight sync: bucketed pushes vs one `ray.put` of the state dict" in page
    assert f"| `micro` | {micro['params']:,} | 3.43 MiB, " in page
    glance = page.split("## At a glance")[1].split("\n## ")[0]
    assert f"| {micro['baseline_over_bf16_bucket']:.2f}x |" in glance  # the headline row

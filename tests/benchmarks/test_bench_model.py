"""``hybrid-rl bench model --quick`` on the ``micro`` preset: one JSON line whose ratios are its own figures',
whose two models agree, and which says where it ran."""

from __future__ import annotations

import json

import pytest

from hybrid_rl.cli import main


def test_bench_model_json(capsys):
    pytest.importorskip("transformers")
    assert main(["bench", "model", "--preset", "micro", "--quick"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "model" and result["preset"] == "micro"
    assert result["cpu"] and result["commit"]  # where it ran: the figures follow the CPU
    ours, theirs = result["ours"], result["transformers"]
    for key in ("train", "decode"):
        assert ours[f"{key}_tokens_per_s"] > 0 and theirs[f"{key}_tokens_per_s"] > 0
        assert result[f"{key}_speedup"] == pytest.approx(ours[f"{key}_tokens_per_s"] / theirs[f"{key}_tokens_per_s"], abs=0.01)
    # the same weights in both implementations: the same logits, and mostly the same greedy tokens (float ties aside)
    assert result["max_abs_logit_diff"] < 1e-4
    assert result["greedy_tokens_identical_fraction"] > 0.9

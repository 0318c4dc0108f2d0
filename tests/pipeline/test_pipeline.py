"""`hybrid-rl pipeline` end to end on a toy budget: demos -> SFT -> GRPO -> eval of both, one wandb group."""

from __future__ import annotations

import json

import pytest

from hybrid_rl.cli import main
from hybrid_rl.metrics import read_metrics, read_run_info

TOY = ["run.name=pipe", "envs=[hybrid_rl/GuessNumber-v0]", "model.hidden_size=64", "demos.episodes_per_env=16", "sft.train.max_steps=4",
       "sft.train.warmup_steps=1", "sft.train.micro_batch_tokens=1024", "sft.eval.episodes_per_env=2",
       "rl.rollout.prompts_per_step=2", "rl.rollout.samples_per_prompt=2", "rl.rollout.pool.num_workers=0",
       "rl.train.steps=2", "rl.train.micro_batch_tokens=1024", "rl.eval.episodes_per_env=2", "rl.eval.at_start=false",
       "rl.eval.select_best=true", "rl.eval.select_episodes_per_env=2", "eval.episodes_per_env=3", "logging.backends=[jsonl]", "logging.report=false", "run.quiet=true"]


def test_pipeline_config_errors_name_the_section(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "rl.algo.advantage=grp"]) == 2
    assert "rl.algo" in capsys.readouterr().err
    assert main(["pipeline", "demos.noise=2"]) == 2
    assert "noise" in capsys.readouterr().err
    assert main(["pipeline", "demos.teacher=heuristc"]) == 2
    err = capsys.readouterr().err
    assert "teacher" in err and "'heuristic'" in err
    assert main(["pipeline", "eval.split=test"]) == 2
    assert "eval.split" in capsys.readouterr().err
    assert main(["pipeline", "envs=[hybrid_rl/GuessNumber-v0(n)]"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(["pipeline", "eval.temperatures=[1.0]"]) == 2  # it crashed after training, losing results.json
    assert "must include 0" in capsys.readouterr().err
    assert main(["pipeline", "sft.data.jsonl_paths=[mine.jsonl]"]) == 2  # was replaced without a word
    assert "sft.data.jsonl_paths: the pipeline makes its SFT data from demos.*" in capsys.readouterr().err
    assert main(["pipeline", "sft.data.keep_failed_demos=true"]) == 2  # had no effect: demos.keep_failed decides
    assert "sft.data.keep_failed_demos: " in (err := capsys.readouterr().err) and "demos.keep_failed" in err
    assert main(["pipeline", "rl.train.strategy=ddp", "rl.train.processes=2"]) == 2  # ran one process
    assert "rl.train.processes=2: the pipeline runs its stages in one process" in capsys.readouterr().err
    assert main(["pipeline", "rl.eval.split=val"]) == 2  # would show held-out figures in a val run, or the reverse
    assert "rl.eval.split=val: the stages' evals play the seeds of eval.split=eval" in capsys.readouterr().err
    assert main(["pipeline", "sft.eval.end_on_invalid_action=true"]) == 2  # SFT's figures would be measured otherwise
    assert "sft.eval.end_on_invalid_action: the SFT stage's evals play by the RL rollouts' turn rules" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_val_run_evaluates_both_stages_on_val_seeds(tmp_path, monkeypatch, capsys):
    """eval.split=val (choosing a recipe): the SFT and RL stages' own evals play val seeds too, so that no
    held-out figure is shown on the way (they played the eval seeds whatever eval.split said)."""
    import hybrid_rl.rl.train as rl_train
    import hybrid_rl.sft.train as sft_train

    class Stop(Exception):
        pass

    seen = {}

    def fake_sft(cfg):
        seen["sft"] = cfg.eval.split
        seen["sft_rules"] = cfg.eval.turn_rules()
        return {"checkpoint": str(tmp_path / "ckpt"), "run_dir": str(tmp_path / "sft")}

    def fake_rl(cfg):
        seen["rl"] = cfg.eval.split
        raise Stop

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sft_train, "train", fake_sft)
    monkeypatch.setattr(rl_train, "train", fake_rl)
    for split in ("val", "eval"):
        with pytest.raises(Stop):
            main(["pipeline", *TOY, "demos.episodes_per_env=2", f"eval.split={split}", "run.overwrite=true"])
        assert {k: seen[k] for k in ("sft", "rl")} == {"sft": split, "rl": split}
    # and by the RL rollouts' turn rules, so that the SFT and RL rows are measured alike
    with pytest.raises(Stop):
        main(["pipeline", *TOY, "demos.episodes_per_env=2", "run.overwrite=true", "rl.rollout.sampling.stop_strings=['.']",
              "rl.rollout.sampling.ascii_only=true", "rl.rollout.env_timeout_s=7", "rl.rollout.end_on_invalid_action=true"])
    sampling, episode = seen["sft_rules"]
    assert (sampling.stop_strings, sampling.ascii_only, episode.env_timeout_s, episode.end_on_invalid_action) == (["."], True, 7, True)


@pytest.mark.slow
def test_pipeline_end_to_end_slow(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", *TOY]) == 0
    out = capsys.readouterr().out
    assert "SFT" in out and "RL" in out and "GuessNumber-v0" in out
    base = tmp_path / "runs" / "pipe"
    results = json.loads((base / "results.json").read_text())
    assert set(results["results"]) == {"sft", "rl"}
    for stage in ("sft", "rl"):
        for temp in ("T=0", "T=1"):
            assert 0.0 <= results["results"][stage][temp]["eval/success/GuessNumber-v0"] <= 1.0
    assert (base / "results.md").read_text().startswith("## pipe")
    for who in ("random", "teacher", "expert"):  # the scripted policies on the same held-out seeds
        assert 0.0 <= results["baselines"][who]["GuessNumber-v0"]["success"] <= 1.0
    assert results["baselines"]["expert"]["GuessNumber-v0"]["success"] == 1.0
    # rl.eval.select_best: the RL checkpoint compared with SFT is the one kept for its val success
    assert results["checkpoints"]["rl"] == "runs/pipe/rl/best" and (base / "rl" / "best" / "config.json").is_file()
    assert results["rl_selected"]["step"] in (1, 2) and 0.0 <= results["rl_selected"]["val/success"] <= 1.0
    assert f"RL checkpoint: step {results['rl_selected']['step']}" in (base / "results.md").read_text()
    demos = [json.loads(line) for line in (base / "demonstrations.jsonl").read_text().splitlines()]
    assert len(demos) == 16 and all(d["messages"][-1]["role"] == "assistant" for d in demos)
    for stage in ("sft", "rl", "eval"):
        assert read_run_info(base / stage)["group"] == "pipe"
        assert read_metrics(base / stage)
    eval_rows = read_metrics(base / "eval")
    assert [r["step"] for r in eval_rows if "eval/success" in r] == [0, 1]  # step 0 = SFT, step 1 = RL
    # the results page's block reads this run's own stages, from any working directory
    from hybrid_rl.pipeline.results import render

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    block = render(base, block="pipe")
    assert f"commit `{str(read_run_info(base / 'rl').get('git_commit', ''))[:12]}`" in block


def test_results_json_is_strict_and_its_readers_take_null_back_as_nan(tmp_path):
    """A figure that is NaN (an env whose every episode failed) is written as null, which JSON parsers other than
    Python's accept; read_results gives NaN back to the readers that format and average the figures."""
    import math

    from hybrid_rl.metrics import json_safe
    from hybrid_rl.pipeline.recipe import read_results

    res = {"results": {"sft": {"T=0": {"eval/success": float("nan")}}}, "baselines": {"random": {"E": {"success": 0.5}}},
           "init_from": None}
    (tmp_path / "results.json").write_text(json.dumps(json_safe(res)))
    assert "NaN" not in (tmp_path / "results.json").read_text()
    back = read_results(tmp_path)
    assert math.isnan(back["results"]["sft"]["T=0"]["eval/success"]) and back["baselines"]["random"]["E"]["success"] == 0.5
    assert back["init_from"] is None  # only the figures

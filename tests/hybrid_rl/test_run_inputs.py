"""Inputs checked before a run touches anything: non-finite settings, keys written twice, the run resume=true
continues (it exists, it is this stage's, its files read), and an eval that fails on its checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hybrid_rl.checkpoint import TRAINER_STATE, CheckpointError, checkpoint_stage, load_trainer_state
from hybrid_rl.cli import main as cli_main
from hybrid_rl.config import ConfigError, load_config
from hybrid_rl.run import RunConfig, claim_run_dir, resume_point, start_run_dir


@pytest.mark.parametrize("override", ["train.lr=nan", "train.lr=.inf", "train.max_grad_norm=-inf", "train.lr=NaN"])
def test_non_finite_numbers_are_refused_with_the_key(override):
    from hybrid_rl.sft.config import SFTStageConfig

    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}: got .*expected a finite number"):
        load_config(SFTStageConfig, None, [override])


def test_a_key_written_twice_in_a_recipe_is_refused_with_both_lines(tmp_path):
    from hybrid_rl.sft.config import SFTStageConfig

    path = tmp_path / "twice.yaml"
    path.write_text("train: {lr: 1.0e-4, max_steps: 7}\nmodel: {preset: micro}\ntrain: {warmup_steps: 3}\n")
    with pytest.raises(ConfigError, match=r"the key 'train' appears twice in one mapping \(lines 1 and 3\)"):
        load_config(SFTStageConfig, path)
    path.write_text("train:\n  lr: 1.0e-4\n  lr: 5.0e-4\n")
    with pytest.raises(ConfigError, match=r"'lr' appears twice .*lines 2 and 3"):
        load_config(SFTStageConfig, path)
    path.write_text("base: &b {lr: 1.0e-4}\ntrain: {<<: *b, max_steps: 7}\n")  # a YAML merge key is no repeat
    with pytest.raises(ConfigError, match="unknown config key 'base.lr'"):  # (this file's only problem: its extra key)
        load_config(SFTStageConfig, path)


def test_merges_that_override_and_keys_of_other_types_are_no_repeats():
    """A mapping's own key may override one it merges (``<<``), also when its anchor is merged again further
    down (the loader saw the anchor's keys merged into it and called the override a repeat); ``1:`` and ``"1":``
    are two keys. A key written twice inside an anchor is still refused."""
    import yaml

    from hybrid_rl.config import _load_yaml

    text = ("base: &b {lr: 1.0e-4, steps: 5}\n"
            "mid: &m {<<: *b, lr: 2.0e-4}\n"
            "top: {<<: *m, steps: 9}\n"
            "again: {<<: *m}\n"
            "keys: {1: one, '1': text}\n")
    for keep_text in (False, True):
        got = _load_yaml(text, keep_text)
        assert float(getattr(got["top"]["lr"], "value", got["top"]["lr"])) == 2.0e-4
        assert int(getattr(got["top"]["steps"], "value", got["top"]["steps"])) == 9
        assert float(getattr(got["again"]["lr"], "value", got["again"]["lr"])) == 2.0e-4
        assert len(got["keys"]) == 2
    with pytest.raises(yaml.constructor.ConstructorError, match=r"'lr' appears twice in one mapping \(lines 1 and 1\)"):
        _load_yaml("base: &b {lr: 1, lr: 2}\ntop: {<<: *b}\n", False)


def test_two_yaml_keys_that_name_one_key_of_a_mapping_field_are_refused(tmp_path):
    """``1:`` and ``"1":`` are two YAML keys, and one key of a ``dict[str, ...]`` field: the second value
    replaced the first in silence."""
    from hybrid_rl.rl.config import RLStageConfig

    path = tmp_path / "keys.yaml"
    path.write_text('algo: {reward_weights: {1: 0.5, "1": 2.0}}\n')
    with pytest.raises(ConfigError, match=r"algo.reward_weights: the keys 1 and '1' both name '1'; give it once"):
        load_config(RLStageConfig, path)


def test_claim_writes_nothing_start_replaces_the_previous_outputs(tmp_path):
    run = RunConfig(name="r", output_dir=str(tmp_path), overwrite=True)
    old = tmp_path / "r"
    (old / "step_3").mkdir(parents=True)
    (old / "metrics.jsonl").write_text("{}\n")
    (old / "notes.txt").write_text("mine")
    assert claim_run_dir(run, "sft") == old
    assert sorted(p.name for p in old.iterdir()) == ["metrics.jsonl", "notes.txt", "step_3"]
    start_run_dir(old, run, {"a": 1})
    assert sorted(p.name for p in old.iterdir()) == ["config.yaml", "notes.txt"]
    with pytest.raises(FileExistsError, match="already exists"):
        claim_run_dir(RunConfig(name="r", output_dir=str(tmp_path)), "sft")


def _checkpoint(run_dir, step, state):
    (run_dir / f"step_{step}").mkdir(parents=True)
    torch.save(state, run_dir / f"step_{step}" / TRAINER_STATE)
    return run_dir / f"step_{step}"


def test_resume_point_names_what_is_missing_and_whose_run_it_is(tmp_path):
    run = RunConfig(name="x", output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist; check run.name"):
        resume_point(run, "rl")
    (tmp_path / "x").mkdir()
    with pytest.raises(ConfigError, match="has no step_N checkpoint"):
        resume_point(run, "rl")
    with pytest.raises(ConfigError, match="needs run.name"):
        resume_point(RunConfig(output_dir=str(tmp_path)), "rl")
    # checkpoints written before the stage was recorded: SFT's hold its data cursor
    legacy_sft = _checkpoint(tmp_path / "x", 2, {"optimizer": {}, "step": 2, "cursor": 2, "tokens": 9})
    assert checkpoint_stage(legacy_sft) == "sft"
    with pytest.raises(ConfigError, match=rf"a run of the sft stage and this is the rl stage.*init_from={legacy_sft}"):
        resume_point(run, "rl")
    assert resume_point(run, "sft") == legacy_sft
    newer = _checkpoint(tmp_path / "x", 4, {"stage": "rl", "optimizer": {}, "step": 4})
    assert checkpoint_stage(newer) == "rl" and resume_point(run, "rl") == newer


def test_a_torn_trainer_state_is_a_checkpoint_error_that_names_the_file(tmp_path):
    ckpt = _checkpoint(tmp_path / "r", 5, {"stage": "rl", "optimizer": {"w": torch.zeros(4096)}, "step": 5})
    path = ckpt / TRAINER_STATE
    path.write_bytes(path.read_bytes()[:700])
    for read in (lambda: load_trainer_state(ckpt), lambda: checkpoint_stage(ckpt)):
        with pytest.raises(CheckpointError, match=rf"{path} cannot be read .*incomplete or damaged. Delete {ckpt}"):
            read()


def test_rl_resume_of_another_model_names_the_init_from_the_run_started_with(tmp_path):
    from hybrid_rl.rl.config import RLStageConfig
    from hybrid_rl.rl.train import _check_resumed_model

    ckpt = tmp_path / "r" / "step_2"
    ckpt.mkdir(parents=True)
    (tmp_path / "r" / "config.yaml").write_text("init_from: runs/sft-a/step_400\n")
    cfg = load_config(RLStageConfig, None, ["init_from=runs/sft-b/step_400"])
    policy = {"w": torch.zeros(4, 8), "b": torch.zeros(4)}
    _check_resumed_model(cfg, ckpt, "runs/sft-b/step_400", policy, {k: v.clone() for k, v in policy.items()})  # same
    with pytest.raises(ConfigError, match=r"1 tensor\(s\) differ, e.g. w \(4, 8\) against \(4, 16\).*"
                                          r"the run started with init_from: 'runs/sft-a/step_400'"):
        _check_resumed_model(cfg, ckpt, "runs/sft-b/step_400", policy, {"w": torch.zeros(4, 16), "b": torch.zeros(4)})


def test_an_eval_that_fails_on_its_checkpoint_keeps_the_previous_eval(tmp_path, capsys):
    from hybrid_rl.model import HybridConfig, HybridLM
    from hybrid_rl.model.hf import save_pretrained
    from hybrid_rl.model.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    good = tmp_path / "ckpt"
    save_pretrained(HybridLM(HybridConfig.from_preset("micro")), good, ByteTokenizer())
    def args(checkpoint, *extra):
        return ["eval", "--checkpoint", str(checkpoint), "--env", "hybrid_rl/GuessNumber-v0", "--episodes", "2",
                "--workers", "0", f"run.output_dir={tmp_path / 'runs'}", "run.name=ev", "episode.max_turn_tokens=4",
                "run.quiet=true", *extra]

    assert cli_main(args(good)) == 0
    before = json.loads((tmp_path / "runs" / "ev" / "eval.json").read_text())
    torn = tmp_path / "torn"
    shutil.copytree(good, torn)
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    capsys.readouterr()
    assert cli_main(args(torn, "run.overwrite=true")) == 2
    err = capsys.readouterr().err
    assert "hybrid-rl eval: error:" in err and "Traceback" not in err, err
    assert json.loads((tmp_path / "runs" / "ev" / "eval.json").read_text()) == before  # the earlier eval stays


def test_an_rl_resume_with_a_missing_init_from_says_why_it_is_needed(tmp_path):
    from hybrid_rl.rl.config import RLStageConfig
    from hybrid_rl.rl.train import load_policy

    cfg = load_config(RLStageConfig, None, [f"init_from={tmp_path / 'gone'}", "resume=true", "run.name=x", "algo.kl_beta=0.1"])
    with pytest.raises(FileNotFoundError, match="resume=true needs it too: it is the reference policy"):
        load_policy(cfg)
    # with kl_beta=0 nothing of init_from is needed: the run's own checkpoint is, and here there is none
    cfg = load_config(RLStageConfig, None, [f"init_from={tmp_path / 'gone'}", "resume=true", "run.name=x",
                                            f"run.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="run directory .* does not exist"):
        load_policy(cfg)

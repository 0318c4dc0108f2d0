"""`hybrid-rl rl` end to end: config errors before work, a 2-step smoke run, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hybrid_rl.cli import main
from hybrid_rl.metrics import read_metrics

# a micro policy from scratch, tiny groups, in-process rollouts: the loop's plumbing, not learning
SMOKE = ["init_from=", "algo.mode=sync", "algo.updates_per_batch=1", "model.preset=micro", "model.hidden_size=64", "envs=[hybrid_rl/GuessNumber-v0]",
         "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.max_turn_tokens=3",
         "rollout.max_episode_tokens=256", "rollout.pool.num_workers=0", "train.micro_batch_tokens=512",
         "eval.episodes_per_env=2", "eval.every_steps=0", "logging.backends=[jsonl]", "logging.report=false",
         "run.quiet=true"]


@pytest.mark.parametrize("override, expected", [
    ("algo.policy_loss=gpso", ["algo", "'gpso'", "Did you mean 'gspo'"]),
    ("rollout.samples_per_prompt=1", ["samples_per_prompt", "baseline"]),
    ("rollout.prompts_per_step=3", ["prompts_per_step", "multiple"]),
    ("train.micro_batch_tokens=100", ["micro_batch_tokens", "max_episode_tokens"]),
    ("algo.mode=asynch", ["algo.mode", "'async'"]),
    ("envs=[hybrid_rl/GuesNumber-v0]", ["GuesNumber", "GuessNumber-v0"]),
    ("train.lr=fast", ["train.lr", "'fast'", "expected float"]),
    ("train.min_lr_ratio=1.5", ["min_lr_ratio", "[0, 1]", "constant"]),
    ("eval.select_episodes_per_env=0", ["select_episodes_per_env", ">= 1", "select_best"]),
    ("algo.clip_cov_lb=6", ["algo", "clip_cov_lb", "clip_cov_ub", "<="]),
    ("algo.advantage=grpo algo.grpo_std_floor=-1", ["grpo_std_floor", ">= 0", "algo.grpo_std_floor=0.25"]),
    ("algo.policy_loss=klcov", ["algo", "'klcov'", "Did you mean 'kl-cov'", "'clip-cov'"]),
    ("algo.routing_replay=true model.layer_pattern=M*M init_from=", ["algo.routing_replay", "no MoE layers", "set both to false"]),
    ("train.beta2=1.5", ["train.beta2", "[0, 1)", "train.beta2=0.99"]),
    ("rollout.env_timeout_s=-1", ["env_timeout_s", ">= 0"]),
    ("algo.clip_eps_low=1.5", ["clip_eps_low", "at most 1", "algo.clip_eps_low=0.2"]),
    ("envs=[hybrid_rl/GuessNumber-v0,hybrid_rl/GuessNumber-v0]", ["GuessNumber-v0", "more than once"]),
    ("model.vocab_size=200 init_from=", ["tokenizer has 272 ids", "embeds only 200", "model.vocab_size=272"]),
])
def test_bad_config_fails_before_any_work(override, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    extra = ["envs=[hybrid_rl/GuessNumber-v0,hybrid_rl/FrozenLake-v1]"] if "prompts_per_step" in override else []
    code = main(["rl", *extra, *override.split(), "run.output_dir=runs"])
    err = capsys.readouterr().err
    assert code == 2, err
    for piece in expected:
        assert piece in err, err
    assert not (tmp_path / "runs").exists()


def test_rl_smoke_two_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["rl", *SMOKE, "train.steps=2", "run.name=smoke"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint"].endswith("step_2")
    rows = read_metrics(tmp_path / "runs" / "smoke")
    steps = [r["step"] for r in rows if "rollout/reward" in r]
    assert steps == [1, 2]
    last = rows[-1]
    for key in ("rollout/success/GuessNumber-v0", "train/staleness_max", "perf/rollout_s", "perf/train_s",
                "perf/weight_sync_s", "eval/success/GuessNumber-v0", "train/lr"):
        assert key in last, key
    assert last["train/staleness_max"] == 0.0  # sync mode is on-policy
    diffs = [r["train/rollout_logprob_diff_max"] for r in rows if "train/rollout_logprob_diff_max" in r]
    assert diffs and max(diffs) <= 1e-4  # rollout and trainer share the model code: same log-probs
    assert (tmp_path / "runs" / "smoke" / "step_2" / "config.json").is_file()


def test_the_stage_gives_the_process_its_thread_count_back(tmp_path, monkeypatch, capsys):
    # train.torch_threads holds for the stage only: left at 1, a second pipeline run in the same process
    # trained its SFT on one thread and took other float roundings (the conv kernel's gradient sums over
    # another number of partial sums), so one seed's figure depended on what had run before it
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["rl", *SMOKE, "train.steps=1", "train.torch_threads=1", "run.name=threads"]) == 0
        assert torch.get_num_threads() == 2
        torch.set_num_threads(3)  # also after a stage that fails (here once its policy is built: no MoE to replay)
        assert main(["rl", *SMOKE, "train.steps=1", "train.torch_threads=1", "run.name=fails", "algo.routing_replay=true",
                     "model.layer_pattern=M*M"]) == 2
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("where", ["pool", "update"])
def test_a_run_that_fails_closes_its_logger_as_failed(where, tmp_path, monkeypatch, capsys):
    """A rollout pool that cannot start, or an update that raises: the run's logger is closed, as failed."""
    import hybrid_rl.rl.train as rl_train
    from hybrid_rl.metrics import MetricsLogger

    monkeypatch.chdir(tmp_path)
    closed = []
    real_close = MetricsLogger.close
    monkeypatch.setattr(MetricsLogger, "close", lambda self, failed=False: (closed.append(failed), real_close(self, failed))[1])

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(rl_train, "make_pool" if where == "pool" else "policy_update", boom)
    from hybrid_rl.config import load_config
    from hybrid_rl.rl.config import RLStageConfig

    with pytest.raises(RuntimeError, match="boom"):
        rl_train.train(load_config(RLStageConfig, None, [*SMOKE, "train.steps=2", "run.name=fails"]))
    assert closed == [True]


def test_eval_split_val_plays_val_seeds_in_the_loop(tmp_path, monkeypatch, capsys, record_splits):
    """eval.split=val: the in-loop evals (the learning curve) play val seeds, for choosing a recipe without seeing a
    held-out figure; select_best's evals are val seeds in any case."""
    import hybrid_rl.rl.train as rl_train

    splits = record_splits(rl_train, "evaluate_policy_on")
    monkeypatch.chdir(tmp_path)
    assert main(["rl", *SMOKE, "train.steps=1", "eval.split=val", "run.name=val"]) == 0
    assert main(["rl", *SMOKE, "train.steps=1", "run.name=held-out"]) == 0
    capsys.readouterr()
    assert splits == ["val", "val", "eval", "eval"]  # at the start and at the end of each run


def test_moe_bias_balancing_is_off_during_rl_unless_asked(tmp_path, monkeypatch, capsys):
    """The MoE selection bias moves the policy outside the gradient: by default RL leaves it as it was; with
    train.moe_bias_update_rate it moves (so that this test can tell the two apart)."""
    from hybrid_rl.model.hf import load_pretrained

    monkeypatch.chdir(tmp_path)
    for name, extra in (("default", []), ("balancing", ["train.moe_bias_update_rate=1e-2"])):
        assert main(["rl", *SMOKE, "train.steps=2", "eval.at_start=false", f"run.name={name}", *extra]) == 0
    capsys.readouterr()
    biases = {}
    for name in ("default", "balancing"):
        state = load_pretrained(tmp_path / "runs" / name / "step_2").state_dict()
        biases[name] = [v for k, v in state.items() if k.endswith("e_score_correction_bias")]
    assert biases["default"] and all(torch.count_nonzero(b) == 0 for b in biases["default"])  # from scratch: zeros
    assert any(torch.count_nonzero(b) > 0 for b in biases["balancing"])


def test_select_best_keeps_the_step_with_the_highest_val_success(tmp_path, monkeypatch, capsys):
    """eval.select_best: every eval step plays val seeds; run_dir/best holds the weights of the first RL step with
    the highest val success (step 0 never competes), and the stage's result points there."""
    from hybrid_rl.model.hf import load_pretrained
    from hybrid_rl.rl import train as rl_train

    real, splits = rl_train.evaluate_policy, []
    val_success = iter([0.25, 0.75, 0.75, 0.5])  # an untrained micro policy scores 0 everywhere: set the val figures

    def evaluate_policy(model, tokenizer, cfg, select=False):
        splits.append("val" if select else "eval")
        metrics, trajs = real(model, tokenizer, cfg, select)
        return ({**metrics, "val/success": next(val_success)} if select else metrics), trajs

    monkeypatch.setattr(rl_train, "evaluate_policy", evaluate_policy)
    monkeypatch.chdir(tmp_path)
    assert main(["rl", *SMOKE, "train.steps=4", "train.lr=0.01", "eval.every_steps=1", "eval.select_best=true",
                 "eval.select_episodes_per_env=3", "checkpoint.every_steps=1", "checkpoint.keep_last=0", "run.name=best"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert splits == ["eval"] + ["eval", "val"] * 4  # step 0 (eval.at_start) is never a candidate
    run = tmp_path / "runs" / "best"
    rows = [r for r in read_metrics(run) if "val/success" in r]
    assert [(r["step"], r["val/success"], r["val/best_step"]) for r in rows] == [(1, 0.25, 1), (2, 0.75, 2), (3, 0.75, 2), (4, 0.5, 2)]
    assert "val/success/GuessNumber-v0" in rows[0] and "val/turns" in rows[0]  # the eval table's names, on val seeds
    record = json.loads((run / "best" / "best.json").read_text())
    assert record["step"] == 2 and record["val/success"] == 0.75
    assert Path(out["checkpoint"]).resolve() == (run / "best").resolve()
    assert record["eval"]["eval/success"] == [r for r in read_metrics(run) if r["step"] == 2 and "eval/success" in r][0]["eval/success"]
    best, kept = load_pretrained(run / "best").state_dict(), load_pretrained(run / "step_2").state_dict()
    assert any(not torch.equal(kept[k], v) for k, v in load_pretrained(run / "step_4").state_dict().items())
    for name in kept:
        torch.testing.assert_close(best[name], kept[name], rtol=0, atol=0, msg=name)
    # overwriting the run removes its best checkpoint with the rest of its outputs
    monkeypatch.setattr(rl_train, "evaluate_policy", real)
    assert main(["rl", *SMOKE, "train.steps=1", "run.name=best", "run.overwrite=true"]) == 0
    capsys.readouterr()
    assert not (run / "best").exists()


def test_select_best_survives_a_resume(tmp_path, monkeypatch, capsys):
    """A resumed run compares its new steps with the best kept before the stop, not with nothing."""
    from hybrid_rl.rl import train as rl_train

    real, val_success = rl_train.evaluate_policy, iter([0.5, 0.25, 0.25, 0.4])

    def evaluate_policy(model, tokenizer, cfg, select=False):
        metrics, trajs = real(model, tokenizer, cfg, select)
        return ({**metrics, "val/success": next(val_success)} if select else metrics), trajs

    monkeypatch.setattr(rl_train, "evaluate_policy", evaluate_policy)
    monkeypatch.chdir(tmp_path)
    common = [*SMOKE, "eval.at_start=false", "eval.every_steps=1", "eval.select_best=true", "eval.select_episodes_per_env=2",
              "checkpoint.every_steps=1", "run.name=sel"]
    assert main(["rl", *common, "train.steps=2"]) == 0
    capsys.readouterr()
    assert main(["rl", *common, "train.steps=4", "resume=true"]) == 0
    out = json.loads(capsys.readouterr().out)
    run = tmp_path / "runs" / "sel"
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 1
    assert [r["val/best_step"] for r in read_metrics(run) if "val/best_step" in r] == [1, 1, 1, 1]
    assert Path(out["checkpoint"]).resolve() == (run / "best").resolve()


def test_lr_is_constant_by_default_and_decays_to_its_floor_with_min_lr_ratio():
    from hybrid_rl.config import load_config
    from hybrid_rl.rl.config import RLStageConfig
    from hybrid_rl.rl.train import lr_at

    constant = load_config(RLStageConfig, None, ["train.lr=0.01", "train.steps=5", "train.warmup_steps=2"])
    assert [lr_at(s, constant) for s in range(6)] == pytest.approx([0.005, 0.01, 0.01, 0.01, 0.01, 0.01])
    decay = load_config(RLStageConfig, None, ["train.lr=0.01", "train.steps=5", "train.min_lr_ratio=0.1"])
    lrs = [lr_at(s, decay) for s in range(5)]
    assert lrs[0] == pytest.approx(0.01) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(5, decay) == pytest.approx(0.001) and lr_at(50, decay) == pytest.approx(0.001)  # the floor


def test_resume_continues_exactly(tmp_path, monkeypatch, capsys):
    from hybrid_rl.model.hf import load_pretrained

    monkeypatch.chdir(tmp_path)
    common = [*SMOKE, "eval.at_start=false", "checkpoint.every_steps=1", "checkpoint.keep_last=0"]
    assert main(["rl", *common, "train.steps=2", "run.name=straight"]) == 0
    assert main(["rl", *common, "train.steps=1", "run.name=stopped"]) == 0
    assert main(["rl", *common, "train.steps=2", "run.name=stopped", "resume=true"]) == 0
    capsys.readouterr()
    a = load_pretrained(tmp_path / "runs" / "straight" / "step_2").state_dict()
    b = load_pretrained(tmp_path / "runs" / "stopped" / "step_2").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    r_straight = [r for r in read_metrics(tmp_path / "runs" / "straight") if r["step"] == 2 and "rollout/reward" in r]
    r_resumed = [r for r in read_metrics(tmp_path / "runs" / "stopped") if r["step"] == 2 and "rollout/reward" in r]
    assert r_straight[0]["rollout/reward"] == r_resumed[0]["rollout/reward"]
    # the resume started after step 1 (a run that ignored the checkpoint and trained from 0 would log step 1 twice)
    assert [r["step"] for r in read_metrics(tmp_path / "runs" / "stopped") if "rollout/reward" in r] == [1, 2]


def test_async_mode_trains_on_batches_one_version_old(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["rl", *SMOKE, "algo.mode=async", "train.steps=3", "eval.at_start=false", "run.name=async"]) == 0
    capsys.readouterr()
    rows = [r for r in read_metrics(tmp_path / "runs" / "async") if "rollout/reward" in r]
    assert [r["train/staleness_max"] for r in rows] == [0.0, 1.0, 1.0]  # the first batch comes from version 0


def test_logged_mismatch_is_engine_against_trainer_on_the_same_weights(tmp_path, monkeypatch, capsys):
    # four updates per batch at T=0.7, top-p 0.9: the logged mismatch is the first update's (same weights as the
    # rollout), not the last one's (three Adam steps later); tokens are scored under the sampled distribution
    monkeypatch.chdir(tmp_path)
    assert main(["rl", *SMOKE, "train.steps=2", "run.name=mm", "algo.updates_per_batch=4", "train.lr=1e-2",
                 "rollout.sampling.temperature=0.7", "rollout.sampling.top_p=0.9", "eval.at_start=false",
                 "algo.skip_zero_advantage=false", "algo.entropy_coef=0.01"]) == 0
    capsys.readouterr()
    rows = [r for r in read_metrics(tmp_path / "runs" / "mm") if "train/rollout_logprob_diff_max" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["train/rollout_logprob_diff_max"] <= 1e-4 and abs(r["train/rollout_mismatch_kl"]) <= 1e-6, r
        assert r["train/ratio_mean"] != 1.0  # the last update is off the rollout's weights: ratios moved


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_async_resume_continues_exactly(workers, tmp_path, monkeypatch, capsys):
    # async: the batch of step k is played by version k-1; a resume at k must train on that batch, not replay it.
    # With a Ray worker (the process's one local Ray, started by the pool if no test started it yet), the worker
    # reseeds its sampler per policy version, so the resumed run samples what the uninterrupted one did.
    from hybrid_rl.model.hf import load_pretrained

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    common = [*SMOKE, "algo.mode=async", "eval.at_start=false", "checkpoint.every_steps=1", "checkpoint.keep_last=0",
              f"rollout.pool.num_workers={workers}", "rollout.pool.ray_num_cpus=2", "rollout.sampling.seed=5", "train.lr=1e-2",
              "algo.entropy_coef=0.01"]  # every episode has a gradient: each step moves the weights
    assert main(["rl", *common, "train.steps=3", "run.name=straight"]) == 0
    assert main(["rl", *common, "train.steps=3", "run.name=stopped"]) == 0
    for lost in ("step_2", "step_3"):  # the job died after writing step_1
        shutil.rmtree(tmp_path / "runs" / "stopped" / lost)
    assert main(["rl", *common, "train.steps=3", "run.name=stopped", "resume=true"]) == 0
    capsys.readouterr()
    a = load_pretrained(tmp_path / "runs" / "straight" / "step_3").state_dict()
    b = load_pretrained(tmp_path / "runs" / "stopped" / "step_3").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    keys = ("rollout/reward", "rollout/turns", "train/loss", "train/staleness_max")
    pick = lambda run: [{k: r.get(k) for k in keys} for r in read_metrics(tmp_path / "runs" / run) if "rollout/reward" in r]  # noqa: E731
    straight, resumed = pick("straight"), pick("stopped")
    assert straight[1:] == resumed[-2:] and [r["train/staleness_max"] for r in resumed[-2:]] == [1.0, 1.0]
    steps = [r["step"] for r in read_metrics(tmp_path / "runs" / "stopped") if "rollout/reward" in r]
    assert steps[-2:] == [2, 3] and steps.count(1) == 1  # resumed after step 1, not trained again from 0


def test_pool_env_modules_register_their_ids_in_the_driver_and_an_in_process_pool(tmp_path, monkeypatch):
    """``pool.env_modules`` are imported where ids are checked and seeds drawn, and by an in-process pool, not only
    by Ray workers; a module that cannot be imported is a config error naming the key."""
    from hybrid_rl.config import ConfigError
    from hybrid_rl.envs import check_env_ids
    from hybrid_rl.rollout.config import EpisodeConfig, PoolConfig, SamplingConfig
    from hybrid_rl.rollout.pool import LocalPool, make_pool

    (tmp_path / "poolplugin_mod.py").write_text(
        "import gymnasium\n"
        "from hybrid_rl.benchmarks.fixed_turns import FixedTurnsEnv\n"
        "gymnasium.register('poolplugin/Turns-v0', entry_point=FixedTurnsEnv, disable_env_checker=True)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="Namespace poolplugin not found(.|\n)*pool.env_modules"):
        check_env_ids(["poolplugin/Turns-v0"])  # not registered yet
    with pytest.raises(ConfigError, match="pool.env_modules: cannot import 'no_such_plugin_mod'"):
        check_env_ids(["poolplugin/Turns-v0"], ["no_such_plugin_mod"])
    check_env_ids(["poolplugin/Turns-v0"], ["poolplugin_mod"])
    monkeypatch.delitem(__import__("gymnasium").registry, "poolplugin/Turns-v0")
    monkeypatch.delitem(__import__("sys").modules, "poolplugin_mod")
    from hybrid_rl.model import HybridConfig, HybridLM
    from hybrid_rl.model.tokenizer import ByteTokenizer

    model = HybridLM(HybridConfig.from_preset("micro"))
    pool = make_pool(model, ByteTokenizer(), SamplingConfig(seed=0), EpisodeConfig(max_turn_tokens=3),
                     PoolConfig(num_workers=0, env_modules=["poolplugin_mod"]))
    assert isinstance(pool, LocalPool) and "poolplugin/Turns-v0" in __import__("gymnasium").registry
    pool.close()


def test_routing_mismatch_is_measured_without_replay(tmp_path, monkeypatch, capsys):
    """``algo.log_routing_mismatch`` alone: the rollout records its experts, and the metric tells whether replay would
    change anything (before, nothing was recorded without ``routing_replay`` and the key did nothing)."""
    monkeypatch.chdir(tmp_path)
    assert main(["rl", *SMOKE, "train.steps=1", "run.name=mismatch", "algo.log_routing_mismatch=true",
                 "algo.skip_zero_advantage=false"]) == 0
    capsys.readouterr()
    rows = [r for r in read_metrics(tmp_path / "runs" / "mismatch") if "train/routing_mismatch" in r]
    assert rows and 0.0 <= rows[0]["train/routing_mismatch"] <= 1.0


def test_an_input_refused_late_leaves_the_previous_run_as_it_was(tmp_path, monkeypatch, capsys):
    """run.overwrite cleared the run directory before the optimizer was built: a value only AdamW refused (or
    anything failing there) deleted the previous run and then failed. The directory is now cleared after."""
    from hybrid_rl.rl import train as rl_train

    monkeypatch.chdir(tmp_path)
    assert main(["rl", *SMOKE, "train.steps=1", "run.name=keep"]) == 0
    capsys.readouterr()
    run = tmp_path / "runs" / "keep"
    before = sorted(p.name for p in run.iterdir())

    def refuse(*args, **kwargs):
        raise ValueError("the optimizer refuses")

    monkeypatch.setattr(rl_train, "adamw", refuse)
    with pytest.raises(ValueError, match="the optimizer refuses"):
        main(["rl", *SMOKE, "train.steps=1", "run.name=keep", "run.overwrite=true"])
    assert sorted(p.name for p in run.iterdir()) == before and (run / "step_1").is_dir()


def test_an_unreachable_ray_address_is_refused_before_the_run_directory_is_touched(tmp_path, monkeypatch, capsys):
    """rollout.pool.address where nothing listens: exit 2 with the fix, no traceback, and with run.overwrite the
    previous run is still there (it was cleared, then the pool failed with a traceback)."""
    import socket

    monkeypatch.chdir(tmp_path)
    assert main(["rl", *SMOKE, "train.steps=1", "run.name=keep"]) == 0
    capsys.readouterr()
    run = tmp_path / "runs" / "keep"
    before = sorted(p.name for p in run.iterdir())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    assert main(["rl", *SMOKE, "train.steps=1", "run.name=keep", "run.overwrite=true", "rollout.pool.num_workers=1",
                 f"rollout.pool.address=127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert "nothing listens there" in err and "ray start --head" in err and "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_resume_with_nothing_left_or_another_kl_reference_is_refused(tmp_path, monkeypatch, capsys):
    """train.steps at or below the checkpoint's step resumed into nothing (exit 0, config rewritten); with a KL
    term, init_from resolving to another checkpoint than the run started from changed the reference in silence."""
    from hybrid_rl.model import HybridConfig, HybridLM
    from hybrid_rl.model.hf import save_pretrained
    from hybrid_rl.model.tokenizer import ByteTokenizer

    monkeypatch.chdir(tmp_path)
    cfg = HybridConfig.from_preset("micro", hidden_size=64)
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        save_pretrained(HybridLM(cfg), tmp_path / name, ByteTokenizer())
    common = [*[o for o in SMOKE if not o.startswith("init_from")], "algo.kl_beta=0.1", "checkpoint.every_steps=1",
              "run.name=kl"]
    assert main(["rl", *common, "init_from=a", "train.steps=2"]) == 0
    capsys.readouterr()
    config = (tmp_path / "runs" / "kl" / "config.yaml").read_text()
    assert main(["rl", *common, "init_from=a", "train.steps=2", "resume=true"]) == 2
    assert "nothing left to train; raise train.steps above 2" in capsys.readouterr().err
    assert main(["rl", *common, "init_from=b", "train.steps=3", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "the run started from init_from a (its KL reference" in err and "pass init_from=a to resume" in err
    assert (tmp_path / "runs" / "kl" / "config.yaml").read_text() == config  # nothing touched
    assert main(["rl", *common, f"init_from={tmp_path / 'a'}", "train.steps=3", "resume=true"]) == 0  # the same, spelled otherwise


def test_select_best_never_keeps_a_val_eval_that_scored_nothing(tmp_path, monkeypatch, capsys):
    """A val eval whose every episode failed has success NaN; kept as the best, no later step could beat it
    (x > nan is False) and the stage returned the policy whose eval failed."""
    from hybrid_rl.rl import train as rl_train

    real, val_success = rl_train.evaluate_policy, iter([float("nan"), 0.5, 0.75])

    def evaluate_policy(model, tokenizer, cfg, select=False):
        metrics, trajs = real(model, tokenizer, cfg, select)
        return ({**metrics, "val/success": next(val_success)} if select else metrics), trajs

    monkeypatch.setattr(rl_train, "evaluate_policy", evaluate_policy)
    monkeypatch.chdir(tmp_path)
    assert main(["rl", *SMOKE, "train.steps=3", "eval.at_start=false", "eval.every_steps=1", "eval.select_best=true",
                 "eval.select_episodes_per_env=2", "checkpoint.every_steps=1", "run.name=nan"]) == 0
    capsys.readouterr()
    run = tmp_path / "runs" / "nan"
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 3
    assert [r.get("val/best_step") for r in read_metrics(run) if "val/success" in r] == [None, 2, 3]


def test_a_resume_goes_on_without_its_init_from_when_no_reference_is_kept(tmp_path, monkeypatch, capsys, caplog):
    """With algo.kl_beta=0 nothing of init_from is needed to resume (the checkpoint holds weights, tokenizer and
    shapes): a run whose SFT checkpoint was deleted resumes from its own step_N, to the bit of the uninterrupted run."""
    import shutil

    from hybrid_rl.model.hf import load_pretrained

    monkeypatch.chdir(tmp_path)
    common = [*SMOKE, "eval.at_start=false", "checkpoint.every_steps=1", "checkpoint.keep_last=0"]
    assert main(["rl", *common, "train.steps=1", "run.name=base"]) == 0  # stands in for an SFT checkpoint
    shutil.copytree(tmp_path / "runs" / "base" / "step_1", tmp_path / "kept")
    start = [c for c in common if not c.startswith("init_from=")]
    assert main(["rl", *start, f"init_from={tmp_path / 'kept'}", "train.steps=2", "run.name=straight"]) == 0
    assert main(["rl", *start, f"init_from={tmp_path / 'runs' / 'base'}", "train.steps=1", "run.name=stopped"]) == 0
    shutil.rmtree(tmp_path / "runs" / "base")
    with caplog.at_level("WARNING", logger="hybrid_rl.rl"):
        assert main(["rl", *start, f"init_from={tmp_path / 'runs' / 'base'}", "train.steps=2", "run.name=stopped",
                     "resume=true"]) == 0
    assert "is gone; with algo.kl_beta=0 the resume needs nothing of it" in caplog.text
    a = load_pretrained(tmp_path / "runs" / "straight" / "step_2").state_dict()
    b = load_pretrained(tmp_path / "runs" / "stopped" / "step_2").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    # with a KL reference the resume still needs it, and says so
    assert main(["rl", *start, f"init_from={tmp_path / 'runs' / 'base'}", "train.steps=3", "run.name=stopped",
                 "resume=true", "algo.kl_beta=0.1"]) != 0
    assert "resume=true needs it too: it is the reference policy" in capsys.readouterr().err

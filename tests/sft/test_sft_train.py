"""The SFT loop with the real HybridLM: invariance to packing/micro-batching, exact resume, checkpoints."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from hybrid_rl.checkpoint import list_checkpoints, load_trainer_state
from hybrid_rl.cli import main as cli_main
from hybrid_rl.model import HybridLM
from hybrid_rl.model.config import HybridConfig
from hybrid_rl.sft.packing import MicroBatchStream, model_loss_sum, reference_loss
from hybrid_rl.sft.train import lr_at
from sft_testlib import FAST, losses, run_sft


def _docs(n: int, seed: int = 0):
    """Chat-like documents: bos, prompt bytes, then an assistant span (masked) and its end token."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        prompt = [rng.randrange(16, 272) for _ in range(rng.randint(3, 20))]
        answer = [rng.randrange(16, 272) for _ in range(rng.randint(1, 8))]
        ids = [1, 4] + prompt + [7, 5] + answer + [7]
        docs.append((ids, [0] * (len(prompt) + 4) + [1] * (len(answer) + 1)))
    return docs


def test_hybrid_lm_packed_micro_batched_loss_and_grads_equal_one_doc_at_a_time():
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.from_preset("micro"))
    docs = _docs(7)
    ref = reference_loss(lambda x: model(x).logits, docs)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    stream = MicroBatchStream(docs, row_tokens=64, rows_per_micro_batch=2, seed=1, pad_id=0)
    batches = [stream.micro_batch_at(i) for i in range(stream.micro_batches_per_epoch)]
    assert len(batches) >= 2 and any((b["doc_ids"].amax(1) >= 2).any() for b in batches)  # really packed
    n_tokens = sum(int((b["targets"] >= 0).sum()) for b in batches)
    total = 0.0
    for b in batches:
        loss = model_loss_sum(model, b) / n_tokens  # the trainer's: lm_head at the trained positions only
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(ref.item(), rel=1e-4)
    assert set(ref_grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if name in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[name], rtol=2e-3, atol=2e-5, msg=name)


def test_lr_schedule_warmup_then_cosine_to_min():
    class C:
        lr, warmup_steps, max_steps, min_lr_ratio = 1.0, 4, 14, 0.1

    assert [lr_at(s, C) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, C) == pytest.approx(0.55) and lr_at(14, C) == pytest.approx(0.1) and lr_at(99, C) == pytest.approx(0.1)


def test_grad_accum_equals_one_bigger_micro_batch(tmp_path, chat_jsonl):
    a = run_sft(tmp_path, "accum1", "train.max_steps=2", "train.micro_batch_tokens=256", "train.grad_accum_steps=1",
                data=chat_jsonl)
    b = run_sft(tmp_path, "accum2", "train.max_steps=2", "train.micro_batch_tokens=128", "train.grad_accum_steps=2",
                data=chat_jsonl)
    la, lb = losses(a), losses(b)
    assert la.keys() == {1, 2} and la[1] == pytest.approx(lb[1], rel=1e-5) and la[2] == pytest.approx(lb[2], rel=1e-4)
    wa, wb = load_file(a / "step_2" / "model.safetensors"), load_file(b / "step_2" / "model.safetensors")
    # the two packings put the documents in different rows, so attention batches them differently and sums in
    # another order; Adam's first steps move each weight by ~lr (1.5e-3, 3e-3) whatever the gradient's size, so
    # a rounding difference in a tiny gradient shows at ~1e-6. 2e-5 is 1% of one step's move.
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=2e-5, msg=k)


def test_resume_after_step_k_matches_the_uninterrupted_run(tmp_path, chat_jsonl):
    k = 2
    full = run_sft(tmp_path, "full", "train.max_steps=7", f"train.save_every={k}", "train.keep_last_checkpoints=0",
                   data=chat_jsonl)
    assert [s for s, _ in list_checkpoints(full)] == [2, 4, 6, 7]
    # "stopped after step k": a run directory holding only what the run had written by then
    stopped = tmp_path / "runs" / "stopped"
    stopped.mkdir()
    shutil.copytree(full / f"step_{k}", stopped / f"step_{k}")
    shutil.copy(full / "config.yaml", stopped / "config.yaml")
    state = load_trainer_state(stopped / f"step_{k}", restore_rng=False)
    assert state["step"] == k and state["cursor"] == k
    # the optimizer state is keyed by parameter name (any strategy or process count can resume it)
    assert "exp_avg" in state["optimizer"]["state"]["backbone.embeddings.weight"]
    run_sft(tmp_path, "stopped", "train.max_steps=7", f"train.save_every={k}", "train.keep_last_checkpoints=0",
            "resume=true", data=chat_jsonl)
    resumed, uninterrupted = losses(stopped), losses(full)
    assert sorted(resumed) == list(range(k + 1, 8))
    for step in range(k + 1, k + 6):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7), step
    wf, wr = load_file(full / "step_7" / "model.safetensors"), load_file(stopped / "step_7" / "model.safetensors")
    for name in wf:
        torch.testing.assert_close(wr[name], wf[name], rtol=1e-6, atol=1e-7, msg=name)


def test_loss_goes_down_and_checkpoints_are_pruned(tmp_path, chat_jsonl):
    run = run_sft(tmp_path, "learn", "train.max_steps=8", "train.save_every=3", "train.keep_last_checkpoints=2",
                  data=chat_jsonl)
    ls = losses(run)
    assert ls[8] < 0.7 * ls[1]
    assert [s for s, _ in list_checkpoints(run)] == [6, 8]


def test_bad_data_through_the_cli_names_the_line_and_exits_2(tmp_path, chat_jsonl, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chat_jsonl.read_text() + "{oops\n")
    rc = cli_main(["sft", f"run.output_dir={tmp_path}", "run.name=bad", f"data.jsonl_paths=[{bad}]", "data.envs=[]",
                   "logging.backends=[jsonl]", "run.quiet=true"])
    assert rc == 2 and f"{bad}:49" in capsys.readouterr().err
    run = run_sft(tmp_path, "skip", "train.max_steps=1", "data.on_bad_sample=skip", data=bad)
    from hybrid_rl.metrics import read_metrics

    first = read_metrics(run)[0]
    assert first["train/skipped_samples"] == 1 and first["train/skipped_samples/not_json"] == 1
    assert first["train/samples/jsonl"] == 48


def test_unknown_key_and_bad_sizes_fail_before_work(tmp_path, capsys):
    assert cli_main(["sft", "train.micro_batch_tokns=4"]) == 2
    assert "train.micro_batch_tokens" in capsys.readouterr().err
    assert cli_main(["sft", "data.max_seq_tokens=100", "train.micro_batch_tokens=250"]) == 2
    assert "multiple of data.max_seq_tokens" in capsys.readouterr().err
    out = tmp_path / "typo"
    out.mkdir()
    assert cli_main(["sft", "eval.env_ids=[hybrid_rl/GuesNumber-v0]", f"run.output_dir={out / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert "GuesNumber" in err and "GuessNumber-v0" in err  # before training, not at the first eval after it
    assert not (out / "runs").exists()
    # an env the demonstrations are made on (the eval plays the same ones): a config error, not a traceback
    bad_env = '[{env_id: "hybrid_rl/GuessNumber-v0(nn=3)", episodes: 4}]'
    assert cli_main(["sft", f"data.envs={bad_env}", f"run.output_dir={out / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert "'hybrid_rl/GuessNumber-v0(nn=3)' cannot be made" in err and "no argument 'nn'" in err
    assert "Traceback" not in err and not (out / "runs").exists()


@pytest.mark.slow
def test_two_process_ddp_run_slow_equals_one_process_with_the_same_global_batch(tmp_path, chat_jsonl):
    """`accelerate launch` with 2 CPU processes (gloo), 1 micro-batch each == 1 process, 2 accumulated."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    common = [f"data.jsonl_paths=[{chat_jsonl}]", "data.envs=[]", "train.max_steps=3", "train.micro_batch_tokens=128"]
    single = run_sft(tmp_path, "one", "train.grad_accum_steps=2", *common)
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "hybrid_rl.cli", "sft", f"run.output_dir={tmp_path / 'runs'}",
           "run.name=two", "train.grad_accum_steps=1", *FAST, *common]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "runs" / "two"
    assert load_trainer_state(two / "step_3", restore_rng=False)["world_size"] == 2
    l1, l2 = losses(single), losses(two)
    assert sorted(l2) == [1, 2, 3]
    for step in (1, 2, 3):
        assert l2[step] == pytest.approx(l1[step], rel=1e-5), step
    w1, w2 = load_file(single / "step_3" / "model.safetensors"), load_file(two / "step_3" / "model.safetensors")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_fsdp_started_by_the_command_slow_equals_one_process_with_the_same_global_batch(tmp_path, chat_jsonl):
    """`hybrid-rl sft ... train.strategy=fsdp train.processes=2` starts its own 2 processes (gloo): the same
    losses and weights as 1 process accumulating the same global batch; activation checkpointing changes neither."""
    import os
    import subprocess
    import sys

    common = [f"data.jsonl_paths=[{chat_jsonl}]", "data.envs=[]", "train.max_steps=3", "train.micro_batch_tokens=128"]
    single = run_sft(tmp_path, "one", "train.grad_accum_steps=2", *common)
    cmd = [sys.executable, "-m", "hybrid_rl.cli", "sft", f"run.output_dir={tmp_path / 'runs'}", "run.name=two",
           "train.grad_accum_steps=1", "train.strategy=fsdp", "train.processes=2", "train.activation_checkpointing=true",
           *FAST, *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "runs" / "two"
    assert load_trainer_state(two / "step_3", restore_rng=False)["world_size"] == 2
    l1, l2 = losses(single), losses(two)
    for step in (1, 2, 3):
        assert l2[step] == pytest.approx(l1[step], rel=1e-5), step
    w1, w2 = load_file(single / "step_3" / "model.safetensors"), load_file(two / "step_3" / "model.safetensors")
    assert set(w1) == set(w2)
    for name in w1:  # the bound the trainers promise for 2 processes vs 1 (gloo's reduce-scatter sums in another order)
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5, msg=name)


def test_a_resume_trains_with_its_own_config_optimizer_settings(tmp_path, chat_jsonl):
    """Resumed with another weight decay and beta2: the optimizer's moments come from the checkpoint, its settings from
    the resumed run's config (which its config.yaml records), not from the checkpoint's."""
    run = run_sft(tmp_path, "r", "train.max_steps=2", "train.save_every=2", "train.weight_decay=0.01", "train.beta2=0.95",
                  data=chat_jsonl)
    run_sft(tmp_path, "r", "train.max_steps=3", "train.save_every=3", "train.weight_decay=0.5", "train.beta2=0.5",
            "resume=true", data=chat_jsonl)
    groups = load_trainer_state(run / "step_3", restore_rng=False)["optimizer"]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.5]  # matrices decay, norms and biases do not
    assert {tuple(g["betas"]) for g in groups} == {(0.9, 0.5)}


def test_eval_split_val_plays_val_seeds(tmp_path, chat_jsonl, record_splits):
    """eval.split=val: SFT's evals play val seeds (a run that chooses a recipe sees no held-out figure)."""
    import hybrid_rl.sft.train as sft_train

    splits = record_splits(sft_train, "evaluate_policy")
    for split in ("val", "eval"):
        run_sft(tmp_path, f"split-{split}", "train.max_steps=2", "eval.env_ids=[hybrid_rl/GuessNumber-v0]",
                "eval.episodes_per_env=1", "eval.max_turn_tokens=4", f"eval.split={split}", data=chat_jsonl)
    assert splits == ["val", "eval"]  # the end-of-run eval of each


@pytest.mark.parametrize("split", ["val", "eval"])
def test_the_held_out_loss_reads_the_eval_split_seeds(split, monkeypatch):
    """eval/loss is on expert demonstrations of the ``eval.split`` seeds: a val run computes no loss on the
    held-out eval seeds either."""
    import hybrid_rl.sft.train as sft_train
    from hybrid_rl import envs
    from hybrid_rl.model.tokenizer import ByteTokenizer
    from hybrid_rl.sft.config import DataConfig, EnvDemoConfig, SFTEvalConfig, SFTStageConfig

    seeds = []
    real = sft_train.expert_conversation
    monkeypatch.setattr(sft_train, "expert_conversation", lambda env_id, seed: (seeds.append(seed), real(env_id, seed))[1])
    env = "hybrid_rl/GuessNumber-v0"
    cfg = SFTStageConfig(data=DataConfig(envs=[EnvDemoConfig(env)]), eval=SFTEvalConfig(episodes_per_env=3, split=split))
    docs = sft_train.heldout_docs(cfg, ByteTokenizer())
    assert len(docs) == 3
    assert seeds == envs.seeds(env, split, 3)


def test_a_run_that_fails_mid_training_closes_its_logger_as_failed(tmp_path, chat_jsonl, monkeypatch):
    """An exception in the loop (here the second step) still closes the logger, as failed (wandb's exit code 1),
    so the run's metrics are flushed, its report is built and no wandb run or writer thread is left open."""
    import hybrid_rl.sft.train as sft_train
    from hybrid_rl.config import load_config
    from hybrid_rl.metrics import MetricsLogger
    from hybrid_rl.sft.config import SFTStageConfig

    closed = []
    real_close, real_step = MetricsLogger.close, sft_train.train_step
    monkeypatch.setattr(MetricsLogger, "close", lambda self, failed=False: (closed.append(failed), real_close(self, failed))[1])
    calls = []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sft_train, "train_step", failing_step)
    cfg = load_config(SFTStageConfig, None, [f"run.output_dir={tmp_path / 'runs'}", "run.name=fails", *FAST,
                                             f"data.jsonl_paths=[{chat_jsonl}]", "data.envs=[]", "train.max_steps=3",
                                             "logging.report=true"])
    with pytest.raises(RuntimeError, match="boom"):
        sft_train.train(cfg)
    assert closed == [True]
    run_dir = tmp_path / "runs" / "fails"
    assert (run_dir / "report.html").is_file() and losses(run_dir) == {1: losses(run_dir)[1]}

"""`hybrid-rl rl ... train.strategy=fsdp train.processes=2` from the command line (with a KL term, so a sharded
reference): the command starts its two trainer processes itself; a checkpoint resumes (under `accelerate launch` of the same command) to the same
next step; the checkpoint is a plain HF folder that transformers loads. And the process settings that
cannot work fail before any work."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hybrid_rl.cli import main as cli_main

QUICK = ["init_from=", "train.steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=0", "eval.every_steps=0",
         "eval.at_start=false", "eval.episodes_per_env=4", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4",
         "rollout.pool.num_workers=0", "logging.backends=[jsonl]"]


def rl(tmp_path, name, *extra, launcher=()):
    cmd = [*launcher, "-m", "hybrid_rl.cli", "rl", "configs/rl_quick.yaml", f"run.output_dir={tmp_path}",
           f"run.name={name}", *QUICK, *extra]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def rows(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_fsdp_two_processes_from_the_cli_checkpoint_resume_gives_the_same_next_step_slow(tmp_path):
    import transformers

    from hybrid_rl.model.hf import load_pretrained

    # with a KL term: the reference is sharded too, and built again from the initial weights on resume
    rl(tmp_path, "full", "train.strategy=fsdp", "train.processes=2", "algo.kl_beta=0.05", launcher=[sys.executable])
    full = tmp_path / "full"
    assert sorted(p.name for p in full.glob("step_*")) == ["step_1", "step_2", "step_3"]
    # resume from step 2 in another run directory: the same step 3 (async: the batch of step 3 is in step_2);
    # this time under `accelerate launch` (the launcher's 2 processes; no train.processes)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "step_3")
    accelerate = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    rl(tmp_path, "resumed", "train.strategy=fsdp", "resume=true", "algo.kl_beta=0.05", launcher=accelerate)
    a, b = rows(full)[3], rows(resumed)[3]
    assert a["train/kl"] > 0  # the KL term ran (and was resumed with the same reference: equal below)
    for key in a:
        if key.startswith(("train/", "rollout/", "eval/")):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    wa, wb = load_file(full / "step_3" / "model.safetensors"), load_file(resumed / "step_3" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-6, msg=name)
    # a plain HF folder: transformers loads it and computes our logits
    hf = transformers.AutoModelForCausalLM.from_pretrained(full / "step_3", dtype=torch.float32).eval()
    ours = load_pretrained(full / "step_3").float().eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits.float(), ours(x).logits, atol=1e-4, rtol=0)


def test_process_settings_that_cannot_work_fail_before_any_work(tmp_path, capsys, monkeypatch):
    out = [f"run.output_dir={tmp_path}", "run.name=bad", *QUICK]
    cores = len(os.sched_getaffinity(0))
    assert cli_main(["rl", "configs/rl_quick.yaml", *out, "train.strategy=ddp", f"train.processes={cores + 1}"]) == 2
    err = capsys.readouterr().err
    assert f"train.processes={cores + 1}" in err and f"{cores} CPU cores" in err and f"train.processes={cores} or fewer" in err
    assert cli_main(["rl", "configs/rl_quick.yaml", *out, "train.strategy=fsdp"]) == 2
    assert "strategy=fsdp needs train.processes >= 2" in (err := capsys.readouterr().err) and "--multi_gpu" not in err
    # under `accelerate launch` without --multi_gpu (one process, the launcher's variables set): how to get two
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert cli_main(["rl", "configs/rl_quick.yaml", *out, "train.strategy=fsdp"]) == 2
    assert "accelerate launch --multi_gpu --num_processes 2" in capsys.readouterr().err
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert cli_main(["rl", "configs/rl_quick.yaml", *out, "train.processes=2"]) == 2
    assert "strategy=single runs one process" in capsys.readouterr().err
    assert cli_main(["rl", "configs/rl_quick.yaml", *out, "train.strategy=fsdp", "train.processes=2", "train.dtype=fp16"]) == 2
    assert "train.dtype" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # nothing was started

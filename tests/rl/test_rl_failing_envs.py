"""Runs whose environments fail every episode after the pre-run check passed (a server that went down, an env
that breaks after its first reset): RL stops after FAILED_STEPS_LIMIT such steps with the envs' errors, exit 1,
its metrics and checkpoints kept; ``hybrid-rl eval`` writes its records and exits 1. Both ran to the end with
NaN figures and exit 0, having trained or measured nothing; and eval.json held ``NaN``, which is not JSON."""

from __future__ import annotations

import json

import gymnasium as gym

from hybrid_rl.cli import main
from hybrid_rl.metrics import read_metrics
from hybrid_rl.rl.train import FAILED_STEPS_LIMIT

ENV_ID = "failing_envs_test/BreaksAfterFirstReset-v0"


class BreaksAfterFirstReset(gym.Env):
    """Its first reset in the process works (the pre-run check's), every later one raises."""

    observation_space = action_space = gym.spaces.Text(64)
    resets = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        type(self).resets += 1
        if type(self).resets > 1:
            raise ConnectionError("the env's server went away")
        return "say hi", {}

    def step(self, action):
        return "ok", 1.0, True, False, {}


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point=BreaksAfterFirstReset)

SMOKE = ["init_from=", "model.preset=micro", "model.hidden_size=64", f"envs=[{ENV_ID}]", "rollout.prompts_per_step=2",
         "rollout.samples_per_prompt=2", "rollout.max_turn_tokens=3", "rollout.max_episode_tokens=256",
         "rollout.pool.num_workers=0", "train.micro_batch_tokens=512", "eval.episodes_per_env=2", "eval.every_steps=0",
         "logging.backends=[jsonl]", "logging.report=false", "run.quiet=true", "checkpoint.every_steps=1"]


def test_rl_stops_when_every_episode_of_several_steps_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    BreaksAfterFirstReset.resets = 0
    assert main(["rl", *SMOKE, "train.steps=10", "run.name=broken"]) == 1
    err = capsys.readouterr().err
    assert f"every episode of steps 1-{FAILED_STEPS_LIMIT} ended as env_error or timeout" in err
    assert "the env's server went away" in err and "resume=true" in err and "Traceback" not in err
    rows = read_metrics(tmp_path / "runs" / "broken")
    assert [r["step"] for r in rows if "rollout/env_errors" in r] == list(range(1, FAILED_STEPS_LIMIT + 1))  # kept
    assert all(r["rollout/env_errors"] == 1.0 for r in rows if "rollout/env_errors" in r)


def test_eval_of_an_env_that_fails_every_episode_exits_1_and_writes_strict_json(tmp_path, monkeypatch, capsys):
    import torch

    from hybrid_rl.model import HybridConfig, HybridLM
    from hybrid_rl.model.hf import save_pretrained
    from hybrid_rl.model.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    save_pretrained(HybridLM(HybridConfig.from_preset("micro")), tmp_path / "ckpt", ByteTokenizer())
    BreaksAfterFirstReset.resets = 0
    code = main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--env", ENV_ID, "--episodes", "2", "--workers", "0",
                 f"run.output_dir={tmp_path}", "run.name=ev", "run.quiet=true"])
    assert code == 1
    assert "every episode of the eval ended as env_error" in capsys.readouterr().err
    text = (tmp_path / "ev" / "eval.json").read_text()
    assert "NaN" not in text
    report = json.loads(text)
    assert report["summary"][ENV_ID]["success_rate"] is None and report["summary"][ENV_ID]["failed"] == 2

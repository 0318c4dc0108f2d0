"""A short, real logging loop standing in for a stage: what SFT and eval log, with fake numbers."""

from __future__ import annotations

import math
from pathlib import Path

from hybrid_rl.log import progress
from hybrid_rl.metrics import LoggingConfig, MetricsLogger, env_key

ENVS = ("hybrid_rl/GuessNumber-v0", "hybrid_rl/Wordle-v0")
CONFIG = {"model": {"preset": "micro", "hidden_size": 64}, "train": {"lr": 0.001, "steps": 12}, "run": {"seed": 3}}


def short_job(run_dir: Path, cfg: LoggingConfig, steps: int = 12, eval_every: int = 4) -> list[dict]:
    """Log ``steps`` training steps, an eval every ``eval_every`` and sample episodes; returns what was logged."""
    logged = []
    with MetricsLogger(cfg, run_dir, run_name=run_dir.name, config_dict=CONFIG, group="dash", tags=["test", "tiny"]) as log:
        for step in progress(range(steps), total=steps, desc="train", unit="step"):
            metrics = {"train/loss": 2.0 * math.exp(-step / 6), "train/lr": 1e-3 * min(1.0, (step + 1) / 4),
                       "train/grad_norm": 1.0 + 0.1 * step, "perf/tokens_per_s": 1000.0 + step}
            for layer in (1, 3):
                for e in range(4):
                    metrics[f"moe/expert_load/layer{layer}/e{e}"] = 0.25 + 0.01 * ((e + step) % 4 - 1.5)
            if step % eval_every == eval_every - 1:
                for env_id in ENVS:
                    name = env_key(env_id)
                    metrics |= {f"eval/success/{name}": step / steps, f"eval/return/{name}": step / steps,
                                f"eval/turns/{name}": 3.0, f"eval/env_errors/{name}": 0.0, f"eval/timeouts/{name}": 0.0}
                log.log_samples([episode(step, i) for i in range(3)], step)
            log.log(metrics, step)
            logged.append({"step": step, **metrics})
    return logged


def episode(step: int, i: int) -> dict:
    return {"env_id": ENVS[i % 2], "seed": 100 + i, "return": 1.0, "success": True, "num_turns": 2,
            "messages": [{"role": "system", "content": "Guess the number between 1 and 100. <rules> & more"},
                         {"role": "user", "content": "Your guess?"},
                         {"role": "assistant", "content": f"{50 + i}"},
                         {"role": "user", "content": "lower"},
                         {"role": "assistant", "content": f"{25 + step}"}]}

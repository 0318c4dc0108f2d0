"""``hybrid-rl rl [config.yaml] [key=value ...]``: GRPO-style RL from an SFT checkpoint (``init_from=``)."""

from __future__ import annotations

import argparse
import json

from hybrid_rl.config import add_config_arguments, resolve_config
from hybrid_rl.distributed import cli_argv, is_main_process, spawn, start_processes
from hybrid_rl.envs import check_env_ids
from hybrid_rl.metrics import json_safe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "rl_quick.yaml")


def run(args: argparse.Namespace) -> int:
    from hybrid_rl.rl.config import RLStageConfig

    cfg = resolve_config(RLStageConfig, args)
    if cfg is None:
        return 0
    check_env_ids(cfg.envs, cfg.rollout.pool.env_modules, cfg.rollout.env_timeout_s)
    if start_processes(cfg.train):
        return spawn("rl", cli_argv(args), cfg.train.processes, cfg.train.torch_threads or 1)
    from hybrid_rl.rl.train import train

    result = train(cfg)
    if is_main_process():
        print(json.dumps(json_safe({"run_dir": result["run_dir"], "checkpoint": result["checkpoint"], **result["eval"]}), indent=1))
    return 0


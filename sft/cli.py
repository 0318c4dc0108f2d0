"""``hybrid-rl sft [config.yaml] [key=value ...]``: supervised fine-tuning (default: configs/sft_quick.yaml).

Resume a stopped run with ``run.name=NAME resume=true``; start from other weights with
``init_from=runs/NAME/step_N``. Several processes: ``train.strategy=ddp|fsdp train.processes=N`` (the command
starts them; NCCL on GPUs, gloo on CPU), or ``accelerate launch --num_processes N -m hybrid_rl.cli sft ...``
with ``train.strategy=ddp|fsdp``. ``grad_accum_steps`` is per process: the global batch is N times bigger.
"""

from __future__ import annotations

import argparse
import sys

from hybrid_rl.config import add_config_arguments, resolve_config
from hybrid_rl.distributed import cli_argv, spawn, start_processes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "sft_quick.yaml")


def run(args: argparse.Namespace) -> int:
    from hybrid_rl.sft.config import SFTStageConfig
    from hybrid_rl.sft.data import DataError

    cfg = resolve_config(SFTStageConfig, args)
    if cfg is None:
        return 0
    from hybrid_rl.envs import check_env_ids

    # the envs demonstrations are made on and the eval's: a typo or a broken env fails now, not as a traceback while
    # the demonstrations are made, nor at the first eval (after training, with eval.at_start off)
    env_ids = list(dict.fromkeys([e.env_id for e in cfg.data.envs] + cfg.eval_env_ids))
    check_env_ids(env_ids, timeout_s=cfg.eval.env_timeout_s)
    if start_processes(cfg.train):
        return spawn("sft", cli_argv(args), cfg.train.processes)
    from hybrid_rl.sft.train import train

    try:
        summary = train(cfg)
    except DataError as err:
        print(f"hybrid-rl sft: error: {err}", file=sys.stderr)
        return 2
    if summary.get("wall_s") is not None:  # the main process prints the outcome
        print(_summary_text(summary))
    return 0


def _summary_text(summary: dict) -> str:
    lines = [f"sft: {summary['steps']} steps in {summary['wall_s']:.0f} s; checkpoint {summary['checkpoint']}"]
    start, end = summary.get("eval_start") or {}, summary.get("eval_end") or {}
    for key in sorted(k for k in end if k.startswith("eval/success/")):
        before = f"{start[key]:.2f} -> " if key in start else ""
        lines.append(f"  {key[len('eval/success/'):]:<24} success {before}{end[key]:.2f}")
    return "\n".join(lines)

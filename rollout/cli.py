"""``hybrid-rl eval``: play a checkpoint on environment seeds with the rollout workers.

    hybrid-rl eval --checkpoint runs/sft/step_200 --env hybrid_rl/GuessNumber-v0 --episodes 64
    hybrid-rl eval configs/eval.yaml eval.episodes=16 pool.num_workers=0   # no Ray, in this process

Prints a table (success rate, return, turns and tokens per episode, per environment) and writes
``eval.json`` (and ``trajectories.jsonl``) into the run directory. Greedy decoding by default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from hybrid_rl.config import add_config_arguments, resolve_config
from hybrid_rl.config import ConfigError, to_dict
from hybrid_rl.envs.contract import failed_episodes_error
from hybrid_rl.metrics import json_safe
from hybrid_rl.run import claim_run_dir, seed_everything, start_run_dir
from hybrid_rl.rollout.config import EvalStageConfig

log = logging.getLogger("hybrid_rl.rollout")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "eval.yaml")
    parser.add_argument("--checkpoint", help="checkpoint folder (HF NemotronH layout) = eval.checkpoint")
    parser.add_argument("--env", action="append", dest="env_ids", metavar="ID",
                        help="environment id, repeatable = eval.envs")
    parser.add_argument("--episodes", type=int, help="episodes per environment = eval.episodes")
    parser.add_argument("--workers", type=int, help="Ray rollout workers (0 = in this process) = pool.num_workers")
    parser.add_argument("--address", help="join this Ray cluster = pool.address")
    parser.add_argument("--name", help="run directory name = run.name")


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.checkpoint:
        out.append(f"eval.checkpoint={args.checkpoint}")
    if args.env_ids:
        out.append("eval.envs=[" + ",".join(args.env_ids) + "]")
    for flag, key in (("episodes", "eval.episodes"), ("workers", "pool.num_workers"), ("address", "pool.address"),
                      ("name", "run.name")):
        if getattr(args, flag) is not None:
            out.append(f"{key}={getattr(args, flag)}")
    return out


@dataclass
class CheckpointTokenizer:
    """Picklable: the checkpoint's tokenizer, built inside each worker."""

    path: str

    def __call__(self):
        from hybrid_rl.model.tokenizer import checkpoint_tokenizer

        return checkpoint_tokenizer(self.path)


def run(args: argparse.Namespace) -> int:
    args.overrides = list(args.overrides or []) + _flag_overrides(args)
    cfg = resolve_config(EvalStageConfig, args)
    if cfg is None:
        return 0
    check(cfg)
    seed_everything(cfg.run.seed)
    run_dir = claim_run_dir(cfg.run, "eval")  # a run there that may not be replaced is refused before the eval
    t0 = time.time()
    result = evaluate_checkpoint(cfg)
    elapsed = time.time() - t0
    start_run_dir(run_dir, cfg.run, cfg)  # the eval ran: only now does a previous run's eval.json make way
    print(result.table())
    tokens = sum(t.num_action_tokens for t in result.trajectories)
    report = {
        "checkpoint": cfg.eval.checkpoint, "envs": cfg.eval.envs, "episodes_per_env": cfg.eval.episodes,
        "summary": result.summary, "metrics": result.metrics(),
        "perf": {"eval_s": elapsed, "episodes_per_s": len(result.trajectories) / elapsed,
                 "rollout_tokens_per_s": tokens / elapsed},
        "config": to_dict(cfg),
    }
    (run_dir / "eval.json").write_text(json.dumps(json_safe(report), indent=2, default=float) + "\n")
    if cfg.eval.save_trajectories:
        from hybrid_rl.rollout.trajectory import write_jsonl

        write_jsonl(result.trajectories, run_dir / "trajectories.jsonl")
    print(f"wrote {run_dir / 'eval.json'}")
    if result.trajectories and all(t.failed for t in result.trajectories):
        raise failed_episodes_error(result.trajectories, "every episode of the eval",
                                    f"Nothing was measured (the records are in {run_dir}).")
    return 0


def check(cfg: EvalStageConfig) -> None:
    if not cfg.eval.checkpoint:
        raise ConfigError("eval.checkpoint is empty: pass --checkpoint DIR (a folder with config.json and safetensors).")
    if not (Path(cfg.eval.checkpoint) / "config.json").is_file():
        raise ConfigError(f"eval.checkpoint {cfg.eval.checkpoint!r} has no config.json; pass a checkpoint folder "
                          "written by save_pretrained (e.g. runs/<name>/step_N).")
    if not cfg.eval.envs:
        raise ConfigError("eval.envs is empty: pass --env ID (repeatable), e.g. --env hybrid_rl/GuessNumber-v0.")
    from hybrid_rl.envs import check_env_ids

    check_env_ids(cfg.eval.envs, cfg.pool.env_modules, cfg.episode.env_timeout_s)  # unknown ids fail now (``module:id`` imports the module first)


def evaluate_checkpoint(cfg: EvalStageConfig):
    """``cfg.eval.checkpoint`` on its envs' seeds; a sampling stream not set (``sampling.seed``) is ``run.seed``'s, so
    that a sampled eval plays the same episodes again, in this process or on any number of Ray workers."""
    from hybrid_rl.rollout.evaluate import eval_requests, evaluate

    if cfg.sampling.seed is None:
        cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, seed=cfg.run.seed))
    if cfg.pool.num_workers == 0:  # in this process, on its GPU where it has one (as the RL stage's evals)
        import torch

        from hybrid_rl.rollout.pool import CheckpointModel

        model = CheckpointModel(cfg.eval.checkpoint, "cuda" if torch.cuda.is_available() else "cpu")()  # read onto it
        return evaluate(model, CheckpointTokenizer(cfg.eval.checkpoint)(), cfg.eval.envs, episodes=cfg.eval.episodes,
                        split=cfg.eval.seed_split, sampling=cfg.sampling, episode=cfg.episode)
    from hybrid_rl.rollout.pool import CheckpointModel, RolloutPool

    requests = eval_requests(cfg.eval.envs, None, cfg.eval.episodes, cfg.eval.seed_split)
    with RolloutPool(CheckpointModel(cfg.eval.checkpoint), cfg.pool, cfg.sampling, cfg.episode,
                     CheckpointTokenizer(cfg.eval.checkpoint)) as pool:
        from hybrid_rl.rollout.evaluate import EvalResult, summarize

        trajectories = pool.run_groups(requests)
    return EvalResult(summarize(trajectories), trajectories)

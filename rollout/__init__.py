"""Rollout: the generation engine over model/, multi-turn episodes, trajectories, Ray workers.

``import hybrid_rl.rollout`` does not import Ray: ``Engine``, ``evaluate`` and ``logprob_mismatch`` run in-process
(the SFT loop evaluates with them); ``RolloutPool`` / ``RolloutWorker`` (rollout/pool.py, rollout/worker.py)
load Ray on first use.
"""

from hybrid_rl.rollout.config import EpisodeConfig, EvalStageConfig, PoolConfig, SamplingConfig
from hybrid_rl.rollout.engine import Engine, GroupRequest
from hybrid_rl.rollout.evaluate import EvalResult, evaluate, format_table, summarize
from hybrid_rl.rollout.logprobs import logprob_mismatch, training_logprobs
from hybrid_rl.rollout.trajectory import STATUSES, Trajectory, read_jsonl, write_jsonl

__all__ = [
    "Trajectory", "STATUSES", "read_jsonl", "write_jsonl", "Engine", "GroupRequest", "SamplingConfig",
    "EpisodeConfig", "PoolConfig", "EvalStageConfig", "evaluate", "EvalResult", "summarize", "format_table",
    "logprob_mismatch", "training_logprobs", "RolloutPool", "RolloutWorker", "RolloutTimeoutError",
    "RolloutWorkerError", "CheckpointModel", "ConfigModel", "LocalPool", "make_pool",
]

_POOL_NAMES = {"RolloutPool", "RolloutTimeoutError", "RolloutWorkerError", "CheckpointModel", "ConfigModel", "LocalPool", "make_pool"}


def __getattr__(name):
    if name in _POOL_NAMES:
        from hybrid_rl.rollout import pool

        return getattr(pool, name)
    if name == "RolloutWorker":
        from hybrid_rl.rollout import worker

        return worker.RolloutWorker
    raise AttributeError(f"module 'hybrid_rl.rollout' has no attribute {name!r}")

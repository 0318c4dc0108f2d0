"""Rollout: the generation engine over model/, multi-turn episodes, trajectories, Ray workers.

``import rollout`` does not import Ray: ``Engine``, ``evaluate`` and ``logprob_mismatch`` run in-process
(the SFT loop evaluates with them); ``RolloutPool`` / ``RolloutWorker`` load Ray on first use.
"""

from rollout.config import EpisodeConfig, EvalConfig, PoolConfig, SamplingConfig
from rollout.engine import Engine, GroupRequest
from rollout.evaluate import EvalResult, evaluate, format_table, summarize
from rollout.logprobs import logprob_mismatch, training_logprobs
from rollout.trajectory import STATUSES, Trajectory, read_jsonl, write_jsonl

__all__ = [
    "Trajectory", "STATUSES", "read_jsonl", "write_jsonl", "Engine", "GroupRequest", "SamplingConfig",
    "EpisodeConfig", "PoolConfig", "EvalConfig", "evaluate", "EvalResult", "summarize", "format_table",
    "logprob_mismatch", "training_logprobs", "RolloutPool", "RolloutWorker", "RolloutTimeoutError",
    "RolloutWorkerError", "CheckpointModel", "PresetModel",
]

_RAY_NAMES = {"RolloutPool", "RolloutWorker", "RolloutTimeoutError", "RolloutWorkerError", "CheckpointModel", "PresetModel"}


def __getattr__(name):
    if name in _RAY_NAMES:
        from rollout import worker

        return getattr(worker, name)
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")

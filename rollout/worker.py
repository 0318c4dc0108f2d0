"""The Ray rollout worker: one actor = one model copy, a tokenizer and an ``Engine`` (with its environment
instances) playing the groups it is handed. ``hybrid_rl.rollout.pool.RolloutPool`` starts and drives them.

Weights: ``set_weights`` loads now when idle, else between two decode steps of the running task; every
token records the version it was sampled with (``Trajectory.policy_version``), and a seeded worker
reseeds its sampler per (seed, worker, version), so a resumed run samples as the uninterrupted one.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

import torch

from hybrid_rl.rollout.config import EpisodeConfig, SamplingConfig
from hybrid_rl.rollout.engine import Engine, GroupRequest
from hybrid_rl.rollout.trajectory import Trajectory


def default_tokenizer():
    from hybrid_rl.model.tokenizer import ByteTokenizer

    return ByteTokenizer()


# ----------------------------------------------------------------------------- the worker


class RolloutWorker:
    """Plain class; the pool wraps it with ``ray.remote``: ``run`` on the default thread, one call at a
    time; ``set_weights`` / ``ping`` / ``stats`` on a second ("control") thread beside it."""

    def __init__(self, index: int, model_fn: Callable, tokenizer_fn: Callable | None, sampling: SamplingConfig,
                 episode: EpisodeConfig, torch_threads: int = 1, env_modules: tuple[str, ...] = ()):
        torch.set_num_threads(torch_threads)
        import importlib

        for module in env_modules:
            importlib.import_module(module)
        self.index = index
        self.model = model_fn()
        self.device = torch.device("cuda" if torch.cuda.is_available() and _gpu_assigned() else "cpu")
        self.model.to(self.device)
        if sampling.seed is not None:  # different streams per worker, reproducible per (seed, worker)
            sampling = SamplingConfig(**{**sampling.__dict__, "seed": sampling.seed + 1000 * index})
        self.seed = sampling.seed
        self.name = f"w{index}@{_node_id()[:8]}"
        self.engine = Engine(self.model, (tokenizer_fn or default_tokenizer)(), sampling, episode,
                             worker_name=self.name)
        self.engine.step_hook = self._apply_pending
        self._lock = threading.Lock()
        self._pending: tuple[dict, int] | None = None
        self._playing = False

    def ping(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "node_id": _node_id(), "name": self.name,
                "version": self.engine.policy_version}

    def set_weights(self, state_dict: dict, version: int) -> int:
        """Load now when idle, else between the next two decode steps of the running task."""
        with self._lock:
            self._pending = (state_dict, version)
            playing = self._playing
        if not playing:
            self._apply_pending()
        return version

    def _apply_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            state_dict, version = pending
            self.model.load_state_dict({k: v.to(self.device) for k, v in state_dict.items()})
            self.engine.policy_version = version
            if self.seed is not None:  # a stream per (seed, worker, version): a resumed run samples as the uninterrupted one
                self.engine.generator.manual_seed(self.seed * 1_000_003 + version)

    def run(self, requests: list[GroupRequest]) -> list[Trajectory]:
        with self._lock:
            self._playing = True
        try:
            return self.engine.play(requests)
        finally:
            with self._lock:
                self._playing = False

    def stats(self) -> dict:
        return dict(self.engine.stats)


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() or "local"
    except Exception:  # noqa: BLE001 - outside Ray
        return "local"


def _gpu_assigned() -> bool:
    try:
        import ray

        return bool(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001
        return False

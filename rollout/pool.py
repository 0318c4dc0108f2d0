"""Where the RL loop and ``hybrid-rl eval`` get their episodes: Ray rollout workers or one in-process engine.

Both pools have the same calls: ``push_weights(state_dict, version)``, ``run_groups(requests)`` and
``close()``; ``make_pool`` picks one (``pool.num_workers: 0`` plays in the caller's process: tests,
debugging, one core). Model builders (``ConfigModel``, ``CheckpointModel``) are picklable callables a
worker calls to build its model copy; ``Given`` hands the workers the caller's own tokenizer.

The ``RolloutPool``:

- starts the workers (``num_cpus``/``num_gpus`` each from ``PoolConfig``; spread over the cluster's nodes;
  ``ray.init(address=...)`` joins a cluster, else a local Ray is started);
- ``push_weights(state_dict, version)``: one ``ray.put`` into the object store, every worker loads it. A
  worker in the middle of ``run`` applies new weights between two decode steps;
- ``run_groups(requests)``: splits the groups into tasks, hands a task to each idle worker, gathers the
  trajectories. A worker process that dies is restarted by Ray (``max_restarts=-1``); the pool waits for
  it, pushes the current weights again and re-runs that worker's unfinished task, so the step completes
  with every group. A task running past ``task_timeout_s`` is a stalled worker: the pool restarts that
  worker and raises ``RolloutTimeoutError`` naming it and its groups, never waiting forever.

The ``LocalPool`` keeps its own copy of the policy, so an async step can train while it plays; it
reseeds its sampler from (seed, version) at every push, as the workers do.

Ray is imported here and in rollout/worker.py only; the engine is a plain class.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch

from hybrid_rl.rollout.config import EpisodeConfig, PoolConfig, SamplingConfig
from hybrid_rl.rollout.engine import Engine, GroupRequest
from hybrid_rl.rollout.evaluate import EvalResult, eval_requests, summarize
from hybrid_rl.rollout.trajectory import Trajectory, write_jsonl
from hybrid_rl.rollout.worker import RolloutWorker

log = logging.getLogger("hybrid_rl.rollout")


class RolloutTimeoutError(TimeoutError):
    """A worker did not finish its task within ``pool.task_timeout_s``."""


class RolloutWorkerError(RuntimeError):
    """A worker kept dying (more than ``pool.max_task_retries`` times for one task)."""


# ----------------------------------------------------------------------------- picklable model builders


@dataclass
class CheckpointModel:
    """``hybrid_rl.model.hf.load_pretrained(path)`` inside the worker (fp32 on CPU)."""

    path: str

    def __call__(self):
        from hybrid_rl.model.hf import load_pretrained

        return load_pretrained(self.path).float()


@dataclass
class ConfigModel:
    """A freshly initialised ``HybridLM`` of this shape, fp32 (weights come later through ``push_weights``)."""

    config: Any  # model.HybridConfig
    seed: int = 0

    @classmethod
    def preset(cls, name: str, seed: int = 0) -> "ConfigModel":
        from hybrid_rl.model import HybridConfig

        return cls(HybridConfig.from_preset(name), seed)

    def __call__(self):
        from hybrid_rl.model import HybridLM

        torch.manual_seed(self.seed)
        return HybridLM(self.config).float()


@dataclass
class Given:
    """A picklable ``tokenizer_fn`` that hands the workers the trainer's own tokenizer."""

    tokenizer: object

    def __call__(self):
        return self.tokenizer


# ----------------------------------------------------------------------------- the Ray pool


def ensure_ray(cfg: PoolConfig):
    """Join ``cfg.address`` or start a local Ray (loopback only), unless this process already has one."""
    import ray

    if not ray.is_initialized():
        if cfg.address:
            ray.init(address=cfg.address, log_to_driver=False)
        else:
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind every node to 127.0.0.1
            ray.init(num_cpus=cfg.ray_num_cpus, include_dashboard=False, log_to_driver=False,
                     object_store_memory=cfg.object_store_mb * 1024 ** 2)
    return ray


def check_resources(cfg: PoolConfig, cluster: dict) -> None:
    """Fail now, not after task_timeout_s, when the workers can never all be placed."""
    for key, per_worker, field_name in (("CPU", cfg.num_cpus_per_worker, "num_cpus_per_worker"),
                                        ("GPU", cfg.num_gpus_per_worker, "num_gpus_per_worker")):
        need, have = cfg.num_workers * per_worker, cluster.get(key, 0.0)
        if need > have + 1e-9:
            raise ValueError(
                f"pool.num_workers={cfg.num_workers} x pool.{field_name}={per_worker:g} needs {need:g} {key}s but the "
                f"Ray cluster has {have:g}; lower pool.{field_name} (fractions are fine, e.g. 0.5) or pool.num_workers, "
                f"or start Ray with more (pool.ray_num_cpus).")


def split_requests(requests: list[GroupRequest], num_workers: int, groups_per_task: int = 0) -> list[list[GroupRequest]]:
    """Tasks of whole groups: an even split over the workers (0) or chunks of ``groups_per_task``."""
    if not requests:
        return []
    size = groups_per_task or -(-len(requests) // max(num_workers, 1))
    return [requests[i:i + size] for i in range(0, len(requests), size)]


class RolloutPool:
    def __init__(self, model_fn: Callable, cfg: PoolConfig | None = None, sampling: SamplingConfig | None = None,
                 episode: EpisodeConfig | None = None, tokenizer_fn: Callable | None = None):
        self.cfg = cfg or PoolConfig()
        if self.cfg.num_workers < 1:
            raise ValueError("RolloutPool needs pool.num_workers >= 1; use rollout.evaluate / Engine for no Ray")
        ray = ensure_ray(self.cfg)
        self._ray = ray
        check_resources(self.cfg, ray.cluster_resources())
        self._exc = _actor_death_errors(ray)
        options: dict[str, Any] = dict(num_cpus=self.cfg.num_cpus_per_worker, num_gpus=self.cfg.num_gpus_per_worker,
                                       max_restarts=-1, max_task_retries=0)
        if self.cfg.spread:
            options["scheduling_strategy"] = "SPREAD"
        # `run` one call at a time; set_weights / ping / stats on a "control" thread beside it
        actor_cls = ray.remote(concurrency_groups={"control": 1})(RolloutWorker).options(**options)
        self.workers = [actor_cls.remote(i, model_fn, tokenizer_fn, sampling or SamplingConfig(),
                                         episode or EpisodeConfig(), self.cfg.torch_threads,
                                         tuple(self.cfg.env_modules)) for i in range(self.cfg.num_workers)]
        self.version = 0
        self._weights_ref = None
        self.restarts = 0
        self._stale: set[int] = set()  # workers restarted after a stall: wait for them, re-push weights
        self.info = self._get([self._control(w, "ping") for w in self.workers], "start the workers")

    # ------------------------------------------------------------------ weights
    def push_weights(self, state_dict: dict, version: int) -> None:
        """Every worker loads ``state_dict`` (one copy in the object store); tokens sampled afterwards carry ``version``."""
        cpu = {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}
        self._weights_ref = self._ray.put(cpu)
        self.version = int(version)
        self._get([self._control(w, "set_weights", self._weights_ref, self.version) for w in self.workers],
                  f"push weights version {version}")

    # ------------------------------------------------------------------ rollouts
    def run_groups(self, requests: list[GroupRequest], jsonl_path=None) -> list[Trajectory]:
        """Play every group on the workers; trajectories sorted by (group_id, sample_index).

        ``jsonl_path``: also append them to this JSONL file (one trajectory per line)."""
        ray = self._ray
        for w in sorted(self._stale):
            self._revive(w)
        self._stale.clear()
        tasks = deque((chunk, 0) for chunk in split_requests(list(requests), len(self.workers), self.cfg.groups_per_task))
        idle = deque(range(len(self.workers)))
        running: dict[Any, tuple[int, list[GroupRequest], int, float]] = {}
        out: list[Trajectory] = []
        while tasks or running:
            while tasks and idle:
                chunk, attempts = tasks.popleft()
                w = idle.popleft()
                running[self.workers[w].run.remote(chunk)] = (w, chunk, attempts, time.monotonic())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                w, chunk, attempts, _ = running.pop(ref)
                try:
                    out.extend(ray.get(ref))
                except self._exc as err:
                    if attempts >= self.cfg.max_task_retries:
                        raise RolloutWorkerError(
                            f"rollout worker {w} died {attempts + 1} times running groups {_ids(chunk)}; giving up "
                            f"(pool.max_task_retries={self.cfg.max_task_retries}). Last error: {err}") from err
                    log.warning("rollout worker %d died (%s); re-running its %d groups after Ray restarts it",
                                w, type(err).__name__, len(chunk))
                    self.restarts += 1
                    self._revive(w)
                    tasks.appendleft((chunk, attempts + 1))
                idle.append(w)
            self._check_stalls(running)
        out.sort(key=lambda t: (t.group_id, t.sample_index))
        if jsonl_path is not None:
            write_jsonl(out, jsonl_path, append=True)
        return out

    def _check_stalls(self, running: dict) -> None:
        now = time.monotonic()
        for ref, (w, chunk, _, started) in running.items():
            if now - started > self.cfg.task_timeout_s:
                info = self.info[w] if w < len(self.info) else {}
                for busy, *_ in running.values():  # leave nothing half-done: Ray restarts them, the next call revives them
                    self._ray.kill(self.workers[busy], no_restart=False)
                    self._stale.add(busy)
                    self.restarts += 1
                raise RolloutTimeoutError(
                    f"rollout worker {w} (pid {info.get('pid')}, node {str(info.get('node_id'))[:8]}) did not return "
                    f"groups {_ids(chunk)} within pool.task_timeout_s={self.cfg.task_timeout_s:g} s; it was restarted. "
                    "A stuck environment should hit episode.env_timeout_s first: check the env, or raise the limit.")

    def _revive(self, w: int) -> None:
        """Wait for Ray to restart worker ``w``, then give it the current weights."""
        deadline = time.monotonic() + self.cfg.task_timeout_s
        while True:  # while Ray restarts the actor, calls fail with ActorUnavailableError: ask again
            try:
                timeout = max(deadline - time.monotonic(), 0.1)
                self.info[w] = self._ray.get(self._control(self.workers[w], "ping"), timeout=timeout)
                if self._weights_ref is not None:
                    self._ray.get(self._control(self.workers[w], "set_weights", self._weights_ref, self.version),
                                  timeout=timeout)
                return
            except self._exc:
                if time.monotonic() > deadline:
                    raise RolloutWorkerError(f"rollout worker {w} did not come back within "
                                             f"pool.task_timeout_s={self.cfg.task_timeout_s:g} s after dying") from None
                time.sleep(0.2)
            except self._ray.exceptions.GetTimeoutError:
                raise RolloutTimeoutError(f"rollout worker {w} did not answer within pool.task_timeout_s="
                                          f"{self.cfg.task_timeout_s:g} s after its restart") from None

    @staticmethod
    def _control(actor, method: str, *args):
        """Call on the actor's control thread, beside a running ``run`` (weights land between decode steps)."""
        return getattr(actor, method).options(concurrency_group="control").remote(*args)

    def _get(self, refs, what: str):
        try:
            return self._ray.get(refs, timeout=self.cfg.task_timeout_s)
        except self._ray.exceptions.GetTimeoutError:
            raise RolloutTimeoutError(f"rollout pool: could not {what} within pool.task_timeout_s="
                                      f"{self.cfg.task_timeout_s:g} s (are the workers' resources available?)") from None

    # ------------------------------------------------------------------ evaluation and housekeeping
    def evaluate(self, env_ids, seeds=None, episodes: int = 8, split: str = "eval") -> EvalResult:
        trajectories = self.run_groups(eval_requests(env_ids, seeds, episodes, split))
        return EvalResult(summarize(trajectories), trajectories)

    def stats(self) -> list[dict]:
        return self._get([self._control(w, "stats") for w in self.workers], "read worker stats")

    def close(self) -> None:
        for w in self.workers:
            self._ray.kill(w, no_restart=True)
        self.workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ids(chunk: list[GroupRequest]) -> list[int]:
    return [r.group_id for r in chunk]


def _actor_death_errors(ray) -> tuple[type, ...]:
    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "OwnerDiedError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


# ----------------------------------------------------------------------------- in process


class LocalPool:
    """One ``rollout.Engine`` over a private copy of the policy, in this process."""

    def __init__(self, model, tokenizer, sampling: SamplingConfig, episode: EpisodeConfig, seed: int = 0):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.engine = Engine(self.model, tokenizer, sampling, episode, worker_name="local")
        self.seed = seed

    def push_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.model.load_state_dict(state_dict)
        self.engine.policy_version = version
        self.engine.generator.manual_seed(self.seed * 1_000_003 + version)

    def run_groups(self, requests):
        return sorted(self.engine.play(requests), key=lambda t: (t.group_id, t.sample_index))

    def close(self) -> None:
        self.engine.close()


def make_pool(model, tokenizer, sampling: SamplingConfig, episode: EpisodeConfig, pool_cfg: PoolConfig, seed: int = 0):
    """Ray workers when ``pool_cfg.num_workers > 0``, else ``LocalPool``."""
    if pool_cfg.num_workers == 0:
        return LocalPool(model, tokenizer, sampling, episode, seed)
    if sampling.seed is None:
        sampling = dataclasses.replace(sampling, seed=seed)
    return RolloutPool(ConfigModel(model.config), pool_cfg, sampling, episode, tokenizer_fn=Given(tokenizer))

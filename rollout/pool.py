"""Where the RL loop and ``hybrid-rl eval`` get their episodes: Ray rollout workers or one in-process engine.

Both pools have the same calls: ``push_weights(state_dict, version)``, ``run_groups(requests)`` and
``close()``; ``make_pool`` picks one (``pool.num_workers: 0`` plays in the caller's process: tests,
debugging, one core). Model builders (``ConfigModel``, ``CheckpointModel``) are picklable callables a
worker calls to build its model copy; ``Given`` hands the workers the caller's own tokenizer.

The ``RolloutPool``:

- starts the workers (``num_cpus``/``num_gpus`` each from ``PoolConfig``; spread over the cluster's nodes;
  ``ray.init(address=...)`` joins a cluster, else a local Ray is started). An address where nothing
  listens fails at once (a TCP connect, ``RayClusterUnreachableError``), naming the command that starts a
  head node; an object store too small for the weight buckets fails before any work
  (``ObjectStoreTooSmallError``), naming the settings to change. A local Ray gets an object store of
  ``pool.object_store_mb``, more when the buckets need it;
- ``push_weights(state_dict, version)``: the state dict goes out in buckets of at most ``pool.sync_bucket_mb``
  MiB (``plan_buckets``: tensors in order, cut at bucket boundaries, so a tensor larger than a bucket
  travels in flat pieces and every bucket but the last is full), floating tensors as ``pool.sync_dtype``;
  each bucket is one ``ray.put`` that every worker copies into a staging state dict, and the object store
  holds at most ``SYNC_BUCKETS_IN_FLIGHT`` buckets at a time, never the whole model. Contiguous CPU tensors
  of the wire dtype are put as they are (no clone on the trainer's side); a bf16 cast or a GPU tensor
  costs one bucket-sized copy at a time. A worker applies a version once all its buckets arrived, between
  two decode steps when it is in the middle of ``run``. Versions must increase: an older one is refused
  (``StaleWeightsError``), the same one again is skipped with a warning. The pool keeps the pushed
  tensors (not a copy) to re-push them to a restarted worker, so they must not change in place until the
  next push (rl/train.py pushes a snapshot);
- ``run_groups(requests)``: splits the groups into tasks, hands a task to each idle worker, gathers the
  trajectories. A worker process that dies is restarted by Ray (``max_restarts=-1``); the pool waits for
  it, pushes the current weights again and re-runs that worker's unfinished task, so the step completes
  with every group. A task running past ``task_timeout_s`` is a stalled worker: the pool restarts that
  worker and raises ``RolloutTimeoutError`` naming it and its groups, never waiting forever.

The ``LocalPool`` keeps its own copy of the policy, so an async step can train while it plays; it
reseeds its sampler from (seed, version) at every push, as the workers do: the same stream, so a group plays
the same episodes in this process as on any worker of a Ray pool (``sampling.keyed_uniforms``).

Ray is imported here and in rollout/worker.py only; the engine is a plain class.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch

from hybrid_rl.config import ConfigError
from hybrid_rl.rollout.config import EpisodeConfig, PoolConfig, SamplingConfig
from hybrid_rl.rollout.engine import Engine, GroupRequest
from hybrid_rl.rollout.evaluate import EvalResult, eval_requests, summarize
from hybrid_rl.rollout.trajectory import Trajectory, write_jsonl
from hybrid_rl.rollout.worker import (SYNC_DTYPES, Piece, RolloutWorker, StaleWeightsError, to_wire, version_stream,
                                     wire_dtype)

log = logging.getLogger("hybrid_rl.rollout")


class RolloutTimeoutError(TimeoutError):
    """A worker did not finish its task within ``pool.task_timeout_s``."""


class RolloutWorkerError(RuntimeError):
    """A worker kept dying (more than ``pool.max_task_retries`` times for one task)."""


class RayClusterUnreachableError(ConfigError, ConnectionError):
    """Nothing listens at ``pool.address`` (a config error: the commands report it with its fix, exit code 2)."""


class ObjectStoreTooSmallError(ValueError):
    """The Ray object store cannot hold the weight buckets in flight."""


# ----------------------------------------------------------------------------- picklable model builders


@dataclass
class CheckpointModel:
    """``hybrid_rl.model.hf.load_pretrained(path)`` inside the worker, fp32, read onto ``device`` (the CPU by
    default: a Ray worker moves its model to its GPU itself)."""

    path: str
    device: str | None = None

    def __call__(self):
        from hybrid_rl.model.hf import load_pretrained

        return load_pretrained(self.path, device=self.device, dtype=torch.float32).float()


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


# ----------------------------------------------------------------------------- weight sync

MiB = 1024 ** 2
SYNC_BUCKETS_IN_FLIGHT = 2  # in the object store at once: the workers copy one while the next one is put
STORE_HEADROOM = 2  # the buckets may fill half the object store; trajectories and Ray's own objects get the rest


def plan_buckets(state_dict: dict[str, torch.Tensor], bucket_bytes: int, dtype: torch.dtype) -> list[list[tuple[str, int, int]]]:
    """Which flat elements ``(name, start, stop)`` of which tensor go into which bucket. Tensors in state-dict
    order, cut at bucket boundaries: every bucket but the last holds ``bucket_bytes`` (whole elements of the
    wire dtype, ``wire_dtype(t, dtype)``), and a tensor larger than a bucket spans several."""
    if bucket_bytes < 16:
        raise ValueError(f"a weight bucket must hold at least one element; got {bucket_bytes} bytes")
    buckets: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] = []
    room = bucket_bytes
    for name, tensor in state_dict.items():
        itemsize, numel, start = wire_dtype(tensor, dtype).itemsize, tensor.numel(), 0
        while True:
            take = min(numel - start, room // itemsize)
            if take == 0 and start < numel:  # this bucket is full
                buckets.append(current)
                current, room = [], bucket_bytes
                continue
            current.append((name, start, start + take))
            room -= take * itemsize
            start += take
            if start == numel:
                break
    return buckets + [current] if current or not buckets else buckets


def bucket_pieces(state_dict: dict[str, torch.Tensor], plan: list[tuple[str, int, int]], dtype: torch.dtype) -> list[Piece]:
    """One bucket's pieces: views of the caller's tensors when they are contiguous CPU tensors of the wire
    dtype; otherwise one copy of just this bucket's elements (a cast to bf16, a GPU tensor)."""
    pieces = []
    for name, start, stop in plan:
        tensor = state_dict[name].detach()
        flat = tensor.reshape(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)  # a view when contiguous
        data = flat[start:stop].to(device="cpu", dtype=wire_dtype(tensor, dtype))  # no copy when nothing changes
        pieces.append(Piece(name, tuple(tensor.shape), start, data))
    return pieces


def sync_store_bytes(cfg: PoolConfig, push_bytes: int | None = None) -> int:
    """Object store the weight sync wants: headroom x the buckets in flight (smaller when the whole push is)."""
    bucket = int(cfg.sync_bucket_mb * MiB)
    return STORE_HEADROOM * SYNC_BUCKETS_IN_FLIGHT * (bucket if push_bytes is None else min(bucket, push_bytes))


def check_object_store(cfg: PoolConfig, push_bytes: int, node_stores: dict[str, float]) -> None:
    """Fail before any work when a node's object store cannot hold the weight buckets in flight."""
    need = sync_store_bytes(cfg, push_bytes)
    for node, have in sorted(node_stores.items(), key=lambda kv: kv[1]):
        if have < need:
            fits = have / (STORE_HEADROOM * SYNC_BUCKETS_IN_FLIGHT * MiB)
            raise ObjectStoreTooSmallError(
                f"the Ray object store of node {node[:8]} holds {have / MiB:.0f} MiB, but weight sync wants {need / MiB:.0f} "
                f"MiB: {SYNC_BUCKETS_IN_FLIGHT} buckets in flight of up to {min(cfg.sync_bucket_mb * MiB, push_bytes) / MiB:.1f} "
                f"MiB (pool.sync_bucket_mb={cfg.sync_bucket_mb:g}, pool.sync_dtype={cfg.sync_dtype}), with as much again "
                f"for everything else. Lower pool.sync_bucket_mb to {fits:.3g} or less, or give the cluster's nodes a larger "
                f"store: `ray start ... --object-store-memory=BYTES` (a local Ray started here: pool.object_store_mb).")


def node_object_stores(ray) -> dict[str, float]:
    """Object store bytes of every alive node: a push lands in the trainer's node, each worker pulls into its own."""
    stores = {n["NodeID"]: float(n["Resources"].get("object_store_memory", 0.0)) for n in ray.nodes() if n.get("Alive")}
    return stores or {"cluster": float(ray.cluster_resources().get("object_store_memory", 0.0))}


# ----------------------------------------------------------------------------- the Ray pool


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """A TCP connect to the head node of ``address`` (HOST:PORT, or ray://HOST:PORT): fail at once, with the fix,
    where ``ray.init`` would hang or fail with Ray's own message. ``auto`` (a cluster started on this machine) is
    left to Ray."""
    if address in ("auto", "local"):
        return
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    fix = (f"Start a Ray head node there with `ray start --head --port=6379` (and `ray start --address=HEAD_IP:6379` "
           f"on each other machine), then point the run at it: `rollout.pool.address=HEAD_IP:6379` (`pool.address=` "
           f"for hybrid-rl eval); or drop the setting (`rollout.pool.address=null`) to start a local Ray.")
    if not sep or not port.isdigit():
        raise RayClusterUnreachableError(f"pool.address={address!r} is not HOST:PORT of a Ray head node. {fix}")
    t0 = time.monotonic()
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except OSError as err:
        why = "no answer" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__)
        raise RayClusterUnreachableError(
            f"pool.address={address}: nothing listens there ({why} after {time.monotonic() - t0:.1f} s), so there is "
            f"no Ray cluster to join. {fix}") from None


def ensure_ray(cfg: PoolConfig):
    """Join ``cfg.address`` or start a local Ray (loopback only), unless this process already has one."""
    import ray

    if not ray.is_initialized():
        if cfg.address:
            check_reachable(cfg.address)
            ray.init(address=cfg.address, log_to_driver=False)
        else:
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind every node to 127.0.0.1
            ray.init(num_cpus=cfg.ray_num_cpus, include_dashboard=False, log_to_driver=False,
                     object_store_memory=max(cfg.object_store_mb * MiB, sync_store_bytes(cfg)))
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
        import ray as ray_module

        # a Ray this pool starts (or joins) is shut down by its close(); one the process had already is left running
        self._owns_ray = not ray_module.is_initialized()
        self.workers = []
        ray = self._ray = ensure_ray(self.cfg)
        try:
            self._start(ray, model_fn, sampling, episode, tokenizer_fn)
        except BaseException:  # no worker or Ray of a pool that failed to start is left holding CPUs
            self.close()
            raise

    def _start(self, ray, model_fn, sampling, episode, tokenizer_fn) -> None:
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
        self._current: tuple[dict, int] | None = None  # the last pushed (state_dict, version): for restarted workers
        self.last_push: dict = {}  # bytes, buckets and seconds of the last push
        self.restarts = 0
        self._stale: set[int] = set()  # workers restarted after a stall: wait for them, re-push weights
        self.info = self._get([self._control(w, "ping") for w in self.workers], "start the workers")
        push_bytes = max(i["sync_bytes"][self.cfg.sync_dtype] for i in self.info)
        check_object_store(self.cfg, push_bytes, node_object_stores(ray))

    # ------------------------------------------------------------------ weights
    def push_weights(self, state_dict: dict, version: int) -> None:
        """Every worker gets ``state_dict`` in buckets and applies it whole; tokens sampled afterwards carry ``version``.

        Returns once every worker holds all the buckets (an idle worker has applied them; a playing one applies
        them between two decode steps). ``last_push`` says how many bytes and buckets it took."""
        version = int(version)
        if self._current is not None and version <= self.version:
            if version < self.version:
                raise StaleWeightsError(f"rollout pool: weights version {version} is older than version {self.version}, "
                                        "pushed already; versions pushed to a pool must increase")
            log.warning("rollout pool: weights version %d was pushed already; this push is skipped", version)
            return
        t0 = time.perf_counter()
        self.last_push = self._send(self.workers, state_dict, version)
        self.last_push["seconds"] = time.perf_counter() - t0
        self._current = (state_dict, version)
        self.version = version

    def _send(self, workers: list, state_dict: dict, version: int) -> dict:
        """Put one bucket at a time, each to every worker; at most SYNC_BUCKETS_IN_FLIGHT in the object store."""
        dtype = SYNC_DTYPES[self.cfg.sync_dtype]
        plan = plan_buckets(state_dict, int(self.cfg.sync_bucket_mb * MiB), dtype)
        acks: deque = deque()
        sent = 0
        for index, bucket_plan in enumerate(plan):
            pieces = bucket_pieces(state_dict, bucket_plan, dtype)
            sent += sum(p.data.numel() * p.data.element_size() for p in pieces)
            ref = self._ray.put(to_wire(pieces))
            del pieces  # a cast copy is freed as soon as it is in the store
            acks.append([self._control(w, "receive_bucket", version, index, len(plan), ref) for w in workers])
            del ref  # the store frees the bucket once every worker has copied it
            if len(acks) >= SYNC_BUCKETS_IN_FLIGHT:
                self._get(acks.popleft(), f"push weights version {version}")
        while acks:
            self._get(acks.popleft(), f"push weights version {version}")
        return {"version": version, "bytes": sent, "buckets": len(plan), "dtype": self.cfg.sync_dtype,
                "bucket_mb": self.cfg.sync_bucket_mb}

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
                current = self._current
                if current is not None and self.info[w]["version"] != current[1]:
                    self._send([self.workers[w]], *current)
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
        """Stop the workers, and the Ray this pool started or joined (a second run in the process then starts its own,
        with its own pool settings, instead of reusing this one's)."""
        for w in self.workers:
            self._ray.kill(w, no_restart=True)
        self.workers = []
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False

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
        self.seed = sampling.seed if sampling.seed is not None else seed  # the stream a Ray pool's workers use

    def push_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.model.load_state_dict(state_dict)
        self.engine.policy_version = version
        self.engine.reseed(version_stream(self.seed, version))

    def run_groups(self, requests):
        return sorted(self.engine.play(requests), key=lambda t: (t.group_id, t.sample_index))

    def close(self) -> None:
        self.engine.close()


def make_pool(model, tokenizer, sampling: SamplingConfig, episode: EpisodeConfig, pool_cfg: PoolConfig, seed: int = 0):
    """Ray workers when ``pool_cfg.num_workers > 0``, else ``LocalPool``. ``pool.env_modules`` are imported here
    too: the caller draws the seeds, and a ``LocalPool`` plays in this process."""
    from hybrid_rl.envs import import_env_modules

    import_env_modules(pool_cfg.env_modules)
    if pool_cfg.num_workers == 0:
        return LocalPool(model, tokenizer, sampling, episode, seed)
    if sampling.seed is None:
        sampling = dataclasses.replace(sampling, seed=seed)
    return RolloutPool(ConfigModel(model.config), pool_cfg, sampling, episode, tokenizer_fn=Given(tokenizer))

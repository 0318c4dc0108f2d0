"""The Ray rollout worker: one actor = one model copy, a tokenizer and an ``Engine`` (with its environment
instances) playing the groups it is handed. ``hybrid_rl.rollout.pool.RolloutPool`` starts and drives them.

Weights arrive in buckets (``receive_bucket``, what ``RolloutPool.push_weights`` sends) or as one whole
state dict (``set_weights``). A bucket is a list of flat slices of tensors (``Piece``s, ``to_wire``), so a
tensor larger than a bucket comes in several; the worker copies each into a staging state dict of the
version and applies the version only once all its buckets arrived: now when idle, else between two
decode steps of the running task. The staging is kept in the wire dtype (bf16 halves it) and
``load_state_dict`` casts back into the model's own dtype. Versions only go up: an older version than
the one the worker holds (or has staged complete) is refused with ``StaleWeightsError``, the same
version again is ignored with a warning. ``ping`` and ``stats`` report the version held
(``None``: the weights it was built with).

Every token records the version it was sampled with (``Trajectory.policy_version``), and a seeded
worker reseeds its sampler per (seed, version), so a resumed run samples as the uninterrupted one. The
stream does not depend on the worker: an episode's tokens are keyed by the episode and their position
(``sampling.keyed_uniforms``), so which worker plays a group, and beside which others, changes nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from hybrid_rl.rollout.config import EpisodeConfig, SamplingConfig
from hybrid_rl.rollout.engine import Engine, GroupRequest
from hybrid_rl.rollout.trajectory import Trajectory


log = logging.getLogger("hybrid_rl.rollout")

SYNC_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # pool.sync_dtype -> the dtype on the wire


class StaleWeightsError(ValueError):
    """A weights version older than the one a worker already holds."""


def version_stream(seed: int, version: int) -> int:
    """The sampler's stream seed for policy ``version`` of a run seeded ``seed`` (workers and ``LocalPool``)."""
    return seed * 1_000_003 + version


# ----------------------------------------------------------------------------- weights on the wire


def wire_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """Floating tensors travel in ``dtype``; integer and bool buffers as they are."""
    return dtype if tensor.is_floating_point() else tensor.dtype


def transfer_bytes(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    """Bytes of ``state_dict`` on the wire with floating tensors sent as ``dtype``."""
    return sum(t.numel() * wire_dtype(t, dtype).itemsize for t in state_dict.values())


@dataclass
class Piece:
    """Flat elements ``[start, start + data.numel())`` of the tensor ``name`` (of ``shape``): ``data`` is 1-D."""

    name: str
    shape: tuple[int, ...]
    start: int
    data: torch.Tensor


def to_wire(pieces: list[Piece]) -> list[tuple]:
    """A bucket as Ray stores it without a copy: numpy views (bf16, which numpy lacks, viewed as int16)."""
    out = []
    for p in pieces:
        raw = p.data.view(torch.int16) if p.data.dtype == torch.bfloat16 else p.data
        out.append((p.name, p.shape, p.start, str(p.data.dtype).removeprefix("torch."), raw.numpy()))
    return out


def from_wire(bucket: list[tuple]) -> list[Piece]:
    """``to_wire`` undone; the tensors may be read-only views of the object store: copy them before keeping."""
    pieces = []
    with warnings.catch_warnings():  # "array is not writable": it is only read, by copy_
        warnings.simplefilter("ignore", UserWarning)
        for name, shape, start, dtype_name, array in bucket:
            data = torch.from_numpy(array).view(getattr(torch, dtype_name))
            pieces.append(Piece(name, tuple(shape), int(start), data))
    return pieces


class _Staging:
    """The buckets of one version received so far, copied into whole tensors of the wire dtype."""

    def __init__(self, version: int, count: int):
        self.version, self.count = version, count
        self.received: set[int] = set()
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, index: int, pieces: list[Piece]) -> bool:
        """Copy one bucket in; True once all ``count`` buckets are here."""
        if index in self.received or not 0 <= index < self.count:
            raise ValueError(f"weights version {self.version}: bucket {index} of {self.count} arrived twice or is out of range")
        for p in pieces:
            if p.name not in self.tensors:
                self.tensors[p.name] = torch.empty(p.shape, dtype=p.data.dtype)
            self.tensors[p.name].view(-1)[p.start:p.start + p.data.numel()].copy_(p.data)
        self.received.add(index)
        return len(self.received) == self.count


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
        self.seed = sampling.seed  # every worker the same stream: an episode's tokens do not depend on its worker
        self.name = f"w{index}@{_node_id()[:8]}"
        self.engine = Engine(self.model, (tokenizer_fn or default_tokenizer)(), sampling, episode,
                             worker_name=self.name)
        self.engine.step_hook = self._apply_pending
        self._lock = threading.Lock()
        self._loading = threading.Lock()  # held for a whole weight load (``_apply_pending``)
        self._pending: tuple[dict, int] | None = None
        self._playing = False
        self.weights_version: int | None = None  # the version in self.model (None: the weights it was built with)
        self._staging: _Staging | None = None  # buckets of the version being received (control thread only)

    def ping(self) -> dict:
        state = self.model.state_dict()
        return {"index": self.index, "pid": os.getpid(), "node_id": _node_id(), "name": self.name,
                "version": self.weights_version,
                "sync_bytes": {name: transfer_bytes(state, dtype) for name, dtype in SYNC_DTYPES.items()}}

    def set_weights(self, state_dict: dict, version: int) -> int:
        """One whole state dict: load now when idle, else between the next two decode steps of the running task."""
        if self._accepts(version):
            self._stage_complete(state_dict, version)
        return version

    def receive_bucket(self, version: int, index: int, count: int, bucket: list[tuple]) -> str:
        """Bucket ``index`` of the ``count`` of ``version`` (``to_wire`` format). Returns ``"staged"``, ``"complete"``
        (all buckets here: applied now when idle, else between two decode steps) or ``"ignored"`` (held already)."""
        if not self._accepts(version):
            return "ignored"
        staging = self._staging
        if staging is not None and staging.version > version:
            raise StaleWeightsError(f"rollout worker {self.name} is receiving weights version {staging.version}; "
                                    f"refusing a bucket of the older version {version}")
        if staging is None or staging.version < version:  # a newer version abandons an unfinished older one
            staging = self._staging = _Staging(version, count)
        if not staging.add(index, from_wire(bucket)):
            return "staged"
        self._staging = None
        self._stage_complete(staging.tensors, version)
        return "complete"

    def _accepts(self, version: int) -> bool:
        """Versions only go up: older than the newest held or complete is an error, the same one is ignored."""
        with self._lock:
            held = [v for v in (self.weights_version, self._pending and self._pending[1]) if v is not None]
        newest = max(held, default=None)
        if newest is None or version > newest:
            return True
        if version == newest:
            log.warning("rollout worker %s already holds weights version %d; the repeated push is ignored", self.name, version)
            return False
        raise StaleWeightsError(f"rollout worker {self.name} holds weights version {newest}; refusing the older version "
                                f"{version} (versions pushed to a pool must increase)")

    def _stage_complete(self, state_dict: dict, version: int) -> None:
        with self._lock:
            self._pending = (state_dict, version)
            playing = self._playing
        if not playing:
            self._apply_pending()

    def _apply_pending(self) -> bool:
        """Load the pending weights, if any (the engine's step hook; the control thread when idle). Returns
        whether it loaded. A load runs whole under ``_loading``: a play starting meanwhile waits for it in its
        first hook call, so its first forward sees the new weights (it checks them only then)."""
        with self._loading:
            with self._lock:
                pending, self._pending = self._pending, None
                if pending is not None:  # held from here on: a push of an older version can no longer slip in
                    self.weights_version = pending[1]
            if pending is None:
                return False
            state_dict, version = pending
            self.model.load_state_dict(state_dict)  # copy_ casts a bf16 wire dtype back into the model's own
            self.engine.policy_version = version
            if self.seed is not None:  # a stream per (seed, version): a resumed run samples as the uninterrupted one
                self.engine.reseed(version_stream(self.seed, version))
            return True

    def run(self, requests: list[GroupRequest]) -> list[Trajectory]:
        with self._lock:
            self._playing = True
        try:
            return self.engine.play(requests)
        finally:
            with self._lock:
                self._playing = False

    def stats(self) -> dict:
        return {**self.engine.stats, "weights_version": self.weights_version}

    def weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the model's state dict (tests, debugging)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():  # asking outside Ray would start one
            return ray.get_runtime_context().get_node_id() or "local"
    except Exception:  # noqa: BLE001 - outside Ray
        pass
    return "local"


def _gpu_assigned() -> bool:
    try:
        import ray

        return ray.is_initialized() and bool(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001
        return False

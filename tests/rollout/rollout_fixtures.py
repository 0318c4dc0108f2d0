"""Stand-ins of the rollout tests: a toy recurrent LM with the decoding API of ``model.HybridLM``, and
fault injection (FaultyEnv: the benchmark's FixedTurns environment that raises, hangs, or kills its process).

Ray workers import this module by name (to unpickle a ``ToyModel``, and for ``FAULTY_ID``: an id
``module:env`` makes ``gymnasium.make`` import the module first), so the tests' Ray puts this folder on
the workers' ``PYTHONPATH`` (conftest.py's ``ray_session``).
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium
import torch
from torch import nn

from hybrid_rl.benchmarks.fixed_turns import FixedTurnsEnv

# ----------------------------------------------------------------------------- toy model


@dataclass
class ToyOutput:
    logits: torch.Tensor  # [B, T, V] fp32
    routed_experts: torch.Tensor | None = None


class ToyCache:
    """Per-row recurrent state ``h [B, D]`` and lengths; the HybridCache row operations."""

    def __init__(self, h_bd: torch.Tensor, lengths_b: torch.Tensor):
        self.h_bd, self.lengths = h_bd, lengths_b

    @property
    def batch_size(self) -> int:
        return self.h_bd.shape[0]

    def fork(self, row: int, n: int) -> "ToyCache":
        return ToyCache(self.h_bd[row:row + 1].repeat(n, 1), self.lengths[row:row + 1].repeat(n))

    def select(self, rows) -> "ToyCache":
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return ToyCache(self.h_bd[idx].clone(), self.lengths[idx].clone())

    @staticmethod
    def cat(caches) -> "ToyCache":
        return ToyCache(torch.cat([c.h_bd for c in caches]), torch.cat([c.lengths for c in caches]))

    def nbytes(self) -> int:
        return self.h_bd.numel() * self.h_bd.element_size()


def _rowwise(x_bd, w_nd):
    """x @ w.T computed row by row in one fixed order, so that a row's result never depends on the other
    rows of its batch (a matmul may pick another kernel, and round otherwise, for one row than for many)."""
    return (x_bd[:, None, :] * w_nd[None]).sum(-1)


class ToyLM(nn.Module):
    """h_t = tanh(A h_{t-1} + E[x_t]); logits_t = W h_t. Training forward and cached decoding agree exactly."""

    def __init__(self, vocab_size: int = 272, dim: int = 32, seed: int = 0, logit_scale: float = 3.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.vocab_size, self.dim = vocab_size, dim
        self.embed = nn.Parameter(torch.randn(vocab_size, dim, generator=g) * 0.5)
        self.recur = nn.Parameter(torch.randn(dim, dim, generator=g) / dim ** 0.5)
        self.head = nn.Parameter(torch.randn(vocab_size, dim, generator=g) * logit_scale / dim ** 0.5)

    def _step(self, h_bd, x_b):
        return torch.tanh(_rowwise(h_bd, self.recur) + self.embed[x_b])

    def _logits(self, h_bd):
        return _rowwise(h_bd, self.head)

    def forward(self, input_ids, doc_ids=None, routing=None, record_routing=False) -> ToyOutput:
        b, t = input_ids.shape
        h = torch.zeros(b, self.dim)
        out = []
        for i in range(t):
            h = self._step(h, input_ids[:, i])
            out.append(h)
        return ToyOutput(logits=self._logits(torch.stack(out, 1).reshape(b * t, -1)).reshape(b, t, -1).float())

    def new_cache(self, batch_size: int) -> ToyCache:
        return ToyCache(torch.zeros(batch_size, self.dim), torch.zeros(batch_size, dtype=torch.long))

    def extend(self, cache: ToyCache, tokens) -> torch.Tensor:
        rows = []
        for r, toks in enumerate(tokens):
            h = cache.h_bd[r:r + 1]
            for x in list(toks):
                h = self._step(h, torch.tensor([int(x)]))
            rows.append(h)
            cache.lengths[r] += len(toks)
        cache.h_bd = torch.cat(rows)
        return self._logits(cache.h_bd)

    def decode_step(self, cache: ToyCache, token_ids_b: torch.Tensor) -> torch.Tensor:
        cache.h_bd = self._step(cache.h_bd, token_ids_b.long())
        cache.lengths += 1
        return self._logits(cache.h_bd)


@dataclass
class ToyModel:
    """Picklable builder of a ToyLM (what a Ray worker calls to make its model copy)."""

    vocab_size: int = 272
    dim: int = 32
    seed: int = 0

    def __call__(self) -> ToyLM:
        return ToyLM(self.vocab_size, self.dim, self.seed)


# ----------------------------------------------------------------------------- fault injection


class FaultyEnv(FixedTurnsEnv):
    """FixedTurnsEnv that misbehaves on purpose.

    raise_prob: each reset/step raises RuntimeError with this probability (seeded by the episode seed).
    hang_s: a step sleeps this long when ``hang_on_seed`` equals the episode seed.
    kill_once_file: the first step that finds this file missing creates it and SIGKILLs its own process
    (a worker killed mid-rollout, exactly once across restarts).
    pause_dir / pause_at_turn: at that turn, touch ``reached-<seed>-<pid>`` there and wait for a ``go`` file.
    close_hang_s: close() sleeps this long.
    """

    instant_steps = False  # it can hang, sleep or wait: the engine's worker threads and their time limit

    def __init__(self, raise_prob: float = 0.0, hang_s: float = 0.0, hang_on_seed: int = -1,
                 kill_once_file: str = "", pause_dir: str = "", pause_at_turn: int = -1, close_hang_s: float = 0.0, **kw):
        super().__init__(**kw)
        self.close_hang_s = close_hang_s
        self.raise_prob, self.hang_s, self.hang_on_seed, self.kill_once_file = raise_prob, hang_s, hang_on_seed, kill_once_file
        self.pause_dir, self.pause_at_turn = pause_dir, pause_at_turn
        self._rng = random.Random(0)

    def reset(self, *, seed=None, options=None):
        self._rng = random.Random(int(seed or 0) * 7919 + 1)
        if self._rng.random() < self.raise_prob:
            raise RuntimeError(f"injected reset failure (seed {seed})")
        return super().reset(seed=seed, options=options)

    def step(self, action: str):
        if self.kill_once_file and not Path(self.kill_once_file).exists():
            try:  # O_EXCL: of several processes racing here, exactly one dies
                fd = os.open(self.kill_once_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                fd = None
            if fd is not None:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        if self.pause_dir and self._t == self.pause_at_turn:  # a rendezvous with a test: "reached", wait for "go"
            Path(self.pause_dir, f"reached-{self._seed}-{os.getpid()}").touch()
            deadline = time.monotonic() + 120
            while not Path(self.pause_dir, "go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.hang_s and self._seed == self.hang_on_seed:
            time.sleep(self.hang_s)
        if self._rng.random() < self.raise_prob:
            raise RuntimeError(f"injected step failure (seed {self._seed}, turn {self._t})")
        return super().step(action)

    def close(self):
        time.sleep(self.close_hang_s)
        super().close()


FAULTY_ID = "rollout_fixtures:hybrid_rl_test/Faulty-v0"

if "hybrid_rl_test/Faulty-v0" not in gymnasium.registry:
    gymnasium.register("hybrid_rl_test/Faulty-v0", entry_point=FaultyEnv, disable_env_checker=True, order_enforce=False)

"""Checkpoints that a stage can resume from: ``run_dir/step_N/`` = model files + ``trainer_state.pt``.

Shared by the SFT and RL loops. A checkpoint directory holds whatever ``write_model(dir)`` writes (the
HF NemotronH files via ``hybrid_rl.model.hf.save_pretrained``) and ``trainer_state.pt``: a dict the loop fills
(optimizer, scheduler, data cursor, step) plus the RNG states added here.

Atomic: everything is written into ``run_dir/.step_N.tmp-<pid>/`` and renamed to ``step_N`` in one
``os.replace``; a crash leaves at most a temp dir (ignored by ``latest_checkpoint`` and removed by the
next save), never a half checkpoint that resume would pick up. ``keep_last`` prunes older ``step_N``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = [
    "TRAINER_STATE", "save_checkpoint", "write_dir_atomically", "load_trainer_state", "peek_trainer_state",
    "latest_checkpoint", "list_checkpoints", "rng_state", "set_rng_state", "checkpoint_stage", "CheckpointError",
]

TRAINER_STATE = "trainer_state.pt"


class CheckpointError(ValueError):
    """A checkpoint directory, config or file that cannot be read (as a NemotronH model, or as a trainer state);
    the message says why and what to do."""


_STEP_DIR = re.compile(r"step_(\d+)")


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (``step_N`` with a trainer state) under ``run_dir``, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        m = _STEP_DIR.fullmatch(path.name)
        if m and (path / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def write_dir_atomically(final: Path, write: Callable[[Path], Any]) -> Path:
    """``write(dir)`` fills a temp folder beside ``final`` that then replaces ``final`` (whole, if it exists) in
    ``os.replace`` renames: a reader sees the old folder or the new one, never half of one. Temp folders a
    crashed write left are removed first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp, old = (final.parent / f".{final.name}.{what}-{os.getpid()}" for what in ("tmp", "old"))
    write(tmp)
    if final.exists():
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    write_model: Callable[[Path], Any],
    trainer_state: dict,
    keep_last: int = 0,
) -> Path:
    """Write ``run_dir/step_{step}`` atomically; RNG states are added to ``trainer_state`` under ``"rng"``.

    ``write_model(dir)`` must create/fill ``dir`` (it may itself write atomically into it).
    ``keep_last > 0`` deletes all but the newest ``keep_last`` checkpoints afterwards.
    """
    def write(tmp: Path) -> None:
        write_model(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save({**trainer_state, "rng": rng_state()}, tmp / TRAINER_STATE)

    final = write_dir_atomically(Path(run_dir) / f"step_{step}", write)
    if keep_last > 0:
        for _, path in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_trainer_state(ckpt_dir: str | os.PathLike, restore_rng: bool = True) -> dict:
    """The dict saved with a checkpoint; restores python/numpy/torch RNGs from it unless told not to."""
    path = Path(ckpt_dir) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {ckpt_dir} is not a resumable checkpoint (it needs {TRAINER_STATE} next to the "
            "model files). Pass a step_N directory written by a hybrid-rl training run, or use init_from to "
            "start a fresh run from its weights."
        )
    state = _read_state(path)
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    return state


def peek_trainer_state(ckpt_dir: str | os.PathLike) -> dict:
    """The saved trainer state mapped, not read (the optimizer state can be large), and the RNGs left alone: for
    checks before the run starts (its step, its stage); ``load_trainer_state`` reads it to resume."""
    path = Path(ckpt_dir) / TRAINER_STATE
    if not path.is_file():
        load_trainer_state(ckpt_dir)  # its error: what a resumable checkpoint needs
    return _read_state(path, mmap=True)


def checkpoint_stage(ckpt_dir: str | os.PathLike) -> str:
    """Which stage wrote the checkpoint: ``"sft"`` or ``"rl"`` (its trainer state says so; one written before it
    did is SFT's when it holds a data cursor)."""
    state = peek_trainer_state(ckpt_dir)
    return str(state.get("stage") or ("sft" if "cursor" in state else "rl"))


def _read_state(path: Path, mmap: bool = False) -> dict:
    # weights_only=False: the state holds numpy RNG tuples and plain python objects we wrote ourselves
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as err:  # a torn or truncated file: torch's own message names neither the file nor a way out
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {str(err)[:200]}): the checkpoint is "
                              f"incomplete or damaged. Delete {path.parent} to resume from the checkpoint before it, "
                              "or start the run anew") from err


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # a machine (or CUDA_VISIBLE_DEVICES) with fewer GPUs: theirs
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])

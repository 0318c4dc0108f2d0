"""Run directories: ``runs/<name>/`` with the resolved config, metrics, checkpoints and the report."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from hybrid_rl.config import save_config


class EnvsFailedError(RuntimeError):
    """A stage stopped because its environments failed every episode (env_error / timeout); its data is kept
    (the CLI prints it without a traceback and exits 1)."""


@dataclass
class RunConfig:
    name: str = ""  # run directory name under output_dir; empty = "<stage>-<timestamp>"
    output_dir: str = "runs"
    seed: int = 0  # seeds torch, numpy and python's random for the whole stage
    group: str = ""  # wandb group / report grouping (e.g. one pipeline's SFT and RL runs)
    tags: list[str] = field(default_factory=list)
    log_level: str = "INFO"
    quiet: bool = False  # warnings only, no progress bars (also when CI=true)
    overwrite: bool = False  # replace a previous run's outputs in its directory (resume reads them; a fresh run refuses without this)

    def __post_init__(self):
        if self.name and not re.fullmatch(r"[A-Za-z0-9_.\-/]+", self.name):
            raise ValueError(f"run.name {self.name!r} may only hold letters, digits, '_', '-', '.', '/'")
        if str(self.log_level).upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):  # before any work, not at the start
            raise ValueError(f"run.log_level {self.log_level!r} is not a level; use one of DEBUG, INFO, WARNING, ERROR")


def make_run_dir(run: RunConfig, stage: str, full_config, *, resume: bool = False) -> Path:
    """Create ``output_dir/name`` and write ``config.yaml`` into it; returns the path. (``claim_run_dir`` then
    ``start_run_dir``: a stage with inputs to load first calls them apart.)"""
    return start_run_dir(claim_run_dir(run, stage, resume=resume), run, full_config, resume=resume)


def claim_run_dir(run: RunConfig, stage: str, *, resume: bool = False) -> Path:
    """The run directory's path (``output_dir/name``, or ``<stage>-<timestamp>``), refused when it holds another
    run and neither ``run.overwrite`` nor ``resume`` says what to do with it. Nothing is written yet."""
    name = run.name or f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(run.output_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()) and not (resume or run.overwrite):
        raise FileExistsError(
            f"run directory {run_dir} already exists and is not empty; pick another run.name, "
            f"pass run.overwrite=true to replace that run's outputs, or resume from it."
        )
    return run_dir


def start_run_dir(run_dir: Path, run: RunConfig, full_config, *, resume: bool = False) -> Path:
    """Make ``run_dir`` (from ``claim_run_dir``) the new run's: with ``run.overwrite`` (and not resuming) the
    previous run's outputs go, then ``config.yaml`` is written. A stage calls it once its inputs (``init_from``,
    data, the checkpoint it evaluates) have loaded, so that a run failing on a bad input has cleared nothing."""
    if run.overwrite and not resume:
        clear_run_outputs(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(full_config, run_dir / "config.yaml")
    return run_dir


def resume_point(run: RunConfig, stage: str) -> Path:
    """The checkpoint ``resume=true`` continues: the newest ``step_N`` of the run's directory. Refused, before
    anything in the directory is touched, when there is none (a misspelt ``run.name`` would otherwise start a
    new run in silence) or when the directory holds a run of another stage (an SFT run resumed by the RL stage
    would have its checkpoints rotated away and its metrics mixed with RL's)."""
    from hybrid_rl.checkpoint import checkpoint_stage, latest_checkpoint
    from hybrid_rl.config import ConfigError

    if not run.name:
        raise ConfigError("resume=true needs run.name: the name of the run directory to continue (runs/<name>)")
    run_dir = Path(run.output_dir) / run.name
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        where = "does not exist" if not run_dir.exists() else "has no step_N checkpoint to continue from"
        raise ConfigError(f"resume=true, but the run directory {run_dir} {where}; check run.name and run.output_dir, "
                          f"or drop resume=true to start a new run")
    found = checkpoint_stage(ckpt)
    if found != stage:
        raise ConfigError(f"resume=true, but {run_dir} is a run of the {found} stage and this is the {stage} stage; to "
                          f"start {stage} from its weights, pass init_from={ckpt} with another run.name")
    return ckpt


# what a stage writes into its run directory: run.overwrite replaces these, so a new run's metrics, samples,
# checkpoints and dashboards never mix with the previous run's (the jsonl files are opened for appending,
# which is what resume needs); anything else in the directory is left alone
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "samples.jsonl", "report.html", "run.json", "eval.json",
               "trajectories.jsonl", "tensorboard", "wandb", "best")
_CHECKPOINT_DIR = re.compile(r"\.?step_\d+(\.tmp-\d+)?")  # checkpoints, complete or not (hybrid_rl/checkpoint.py)


def clear_run_outputs(run_dir: Path) -> None:
    """Remove a previous run's outputs from ``run_dir`` (run.overwrite=true), nothing else."""
    import shutil

    if not run_dir.is_dir():
        return
    for path in run_dir.iterdir():
        if path.name not in RUN_OUTPUTS and not (path.is_dir() and _CHECKPOINT_DIR.fullmatch(path.name)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


# what runs and benchmarks write into the checkout (their results, the pages made from them): a change there
# is not a change of the code that ran, so it does not mark the commit dirty
OUTPUT_PATHS = ("benchmarks/results", "docs")


def git_commit(here: Path | None = None) -> str:
    """The source tree's git commit (with '-dirty' when its code has changes; ``OUTPUT_PATHS`` do not count: a
    benchmark that records its first run would otherwise mark its own later runs dirty), or '' outside a checkout."""
    here = here or Path(__file__).resolve().parent  # (a folder of the checkout)
    outputs = [f":(top,exclude){p}" for p in OUTPUT_PATHS]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", *outputs], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{sha}-dirty" if sha and dirty else sha


@contextlib.contextmanager
def torch_threads(n: int):
    """``torch.set_num_threads(n)`` inside the block (n = 0: unchanged), the previous count restored after it."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

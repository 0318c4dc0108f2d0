"""Helpers of the SFT tests: a small chat JSONL and a way to run the real ``hybrid-rl sft`` in-process."""

from __future__ import annotations

import json
import random
from pathlib import Path

from hybrid_rl.cli import main as cli_main
from hybrid_rl.metrics import read_metrics


def write_chat_jsonl(path: Path, n: int = 48, seed: int = 0) -> Path:
    """Small arithmetic conversations, some multi-turn, some with a tool message."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for k in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            messages = [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]
            if k % 3 == 0:
                messages += [{"role": "user", "content": "double it"}, {"role": "assistant", "content": f"calc({a + b}*2)"},
                             {"role": "tool", "content": str(2 * (a + b))}, {"role": "assistant", "content": str(2 * (a + b))}]
            if k % 4 == 0:
                messages.insert(0, {"role": "system", "content": "Answer with a number."})
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


# fast settings: 128-token rows, no eval, no dashboards; each test adds what it checks
FAST = [
    "model.preset=micro", "data.max_seq_tokens=128", "train.micro_batch_tokens=256", "train.warmup_steps=2",
    "train.eval_every=0", "train.save_every=0", "train.lr=3e-3", "logging.backends=[jsonl]",
    "logging.report=false", "eval.at_start=false", "run.quiet=true",
]


def run_sft(tmp_path: Path, name: str, *overrides: str, data: Path | None = None) -> Path:
    """Run ``hybrid-rl sft`` in-process with the FAST settings; returns the run directory."""
    args = ["sft", f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}", *FAST]
    if data is not None:
        args += [f"data.jsonl_paths=[{data}]", "data.envs=[]"]
    rc = cli_main([*args, *overrides])
    assert rc == 0, f"hybrid-rl sft exited with {rc}"
    return tmp_path / "runs" / name


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}

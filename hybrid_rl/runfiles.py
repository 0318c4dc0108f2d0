"""The run directory's record files and their readers: ``metrics.jsonl``, ``samples.jsonl``, ``run.json``,
and the metric name prefixes.

``hybrid_rl.metrics`` writes these files and ``hybrid_rl.report`` reads them; both import this module,
so neither imports the other at load time (the logger builds the report at ``close()``).  The readers
are also what tests and tools use (``hybrid_rl.metrics`` re-exports them).
"""

from __future__ import annotations

import json
from pathlib import Path

METRIC_PREFIXES = ("train/", "rollout/", "eval/", "val/", "perf/", "moe/")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (a torn last line, from a crash mid-write, is skipped)."""
    return _read_jsonl(Path(run_dir) / "metrics.jsonl")


def read_samples(run_dir: str | Path) -> list[dict]:
    return _read_jsonl(Path(run_dir) / "samples.jsonl")


def read_run_info(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1} is not valid JSON: {line[:120]!r}") from None
    return rows

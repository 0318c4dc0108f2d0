"""Write docs/BENCHMARKS.md from the benchmarks' own JSON output (one source of truth for every figure).

    hybrid-rl bench model   > benchmarks/results/model.json
    hybrid-rl bench memory  > benchmarks/results/memory.json
    hybrid-rl bench rollout > benchmarks/results/rollout.json
    python -m benchmarks.record            # -> docs/BENCHMARKS.md

Each results file holds the JSON line(s) a benchmark printed; non-JSON lines (tables, logs) are ignored.
Nothing here is typed by hand: the page is the JSON, flattened into tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INTRO = """# Benchmarks

Produced by `python -m benchmarks.record` from the JSON the benchmarks printed (files in
`benchmarks/results/`); do not edit by hand. Every speed claim is a **ratio measured in the same run**
against the peer (transformers' NemotronH, TRL); absolute figures drift from machine to machine.
Re-run with `make bench`, save each command's output under `benchmarks/results/NAME.json`, then
`python -m benchmarks.record`.
"""


def emit(result: dict, json_out: Path | None = None) -> None:
    """Print a benchmark's result as one JSON line (what ``read_json_lines`` reads) and optionally save it."""
    text = json.dumps(result)
    print(text)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")


def read_json_lines(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def flatten(obj, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(obj, dict):
        rows = []
        for key, value in obj.items():
            rows.extend(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return rows
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        rows = []
        for i, value in enumerate(obj):
            rows.extend(flatten(value, f"{prefix}[{i}]"))
        return rows
    return [(prefix, obj)]


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, list):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def render(results_dir: Path) -> str:
    parts = [INTRO]
    files = sorted(results_dir.glob("*.json"))
    if not files:
        parts.append("\nNo results recorded yet.\n")
    headline = [(path.stem, key, value) for path in files for record in read_json_lines(path)
                for key, value in flatten(record) if "speedup" in key.rsplit(".", 1)[-1]]
    if headline:
        parts.append("\n## Headline ratios (ours / peer, or 2 workers / 1, same run)\n\n| benchmark | figure | ratio |\n|---|---|---|\n")
        parts.extend(f"| {name} | `{key}` | {fmt(value)}x |\n" for name, key, value in headline)
    for path in files:
        records = read_json_lines(path)
        parts.append(f"\n## {path.stem}\n\nFrom `benchmarks/results/{path.name}`.\n")
        for record in records:
            parts.append("\n| figure | value |\n|---|---|\n")
            parts.extend(f"| `{key}` | {fmt(value)} |\n" for key, value in flatten(record))
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    Path(args.out).write_text(render(Path(args.results)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

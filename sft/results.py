"""Write the SFT section of docs/RESULTS.md from a run directory: ``python -m hybrid_rl.sft.results runs/sft-quick``.

Every number comes from the run's own files (``metrics.jsonl``, ``config.yaml``, ``run.json``), so the
doc never holds a hand-copied figure. Only the block between the SFT markers is replaced; the other
sections of RESULTS.md are left as they are.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import yaml

BEGIN, END = "<!-- sft-quick:begin (written by python -m hybrid_rl.sft.results) -->", "<!-- sft-quick:end -->"


def summarize_run(run_dir: str | Path) -> dict:
    """The figures of a finished SFT run: eval at the first and last eval step, wall time, losses, sizes."""
    from hybrid_rl.metrics import read_metrics

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    evals = [r for r in rows if "eval/success" in r]
    train = [r for r in rows if "train/loss" in r]
    if not evals or not train:
        raise ValueError(f"{run_dir}/metrics.jsonl has no eval or train rows; is it a finished `hybrid-rl sft` run?")
    first = next(r for r in rows if "train/samples" in r)
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    envs = sorted(k[len("eval/success/"):] for k in evals[-1] if k.startswith("eval/success/"))
    return {
        "run_dir": str(run_dir), "git_commit": info.get("git_commit", ""),
        "model": cfg["model"].get("preset") or "custom", "max_steps": cfg["train"]["max_steps"],
        "micro_batch_tokens": cfg["train"]["micro_batch_tokens"], "episodes_per_env": cfg["eval"]["episodes_per_env"],
        "samples": int(first["train/samples"]), "skipped": int(first.get("train/skipped_samples", 0)),
        "wall_s": next((r["perf/wall_s"] for r in reversed(rows) if "perf/wall_s" in r), None),
        "cpu_s": next((r["perf/cpu_s"] for r in reversed(rows) if "perf/cpu_s" in r), None),
        "train_s": sum(r.get("perf/step_s", 0.0) for r in train),
        "step_s_min": min((r["perf/step_s"] for r in train if "perf/step_s" in r), default=float("nan")),
        "step_s_median": sorted(r.get("perf/step_s", 0.0) for r in train)[len(train) // 2],
        "eval_s": sum(r.get("perf/eval_s", 0.0) for r in evals),
        "loss_first": train[0]["train/loss"], "loss_last": train[-1]["train/loss"],
        "eval_loss_last": evals[-1].get("eval/loss"),
        "tokens_per_s": sorted(r["perf/tokens_per_s"] for r in train)[len(train) // 2],
        "evals": [{"step": r["step"], **{e: r[f"eval/success/{e}"] for e in envs}, "all": r["eval/success"]} for r in evals],
        "envs": envs,
    }


def markdown(s: dict) -> str:
    head = "| step | " + " | ".join(s["envs"]) + " | mean |"
    lines = [
        BEGIN,
        f"`{s['run_dir']}`: a `{s['model']}` model from random init, {s['samples']} expert "
        f"demonstrations ({s['skipped']} skipped), {s['max_steps']} steps of {s['micro_batch_tokens']} tokens. "
        f"Eval: greedy, {s['episodes_per_env']} held-out seeds per environment; step 0 is the random-init model.",
        "",
        head, "|" + "---|" * (len(s["envs"]) + 2),
        *[f"| {e['step']} | " + " | ".join(f"{e[k]:.2f}" for k in s["envs"]) + f" | {e['all']:.2f} |" for e in s["evals"]],
        "",
        f"- wall time of the whole command (demonstrations, training, evals, checkpoints): {s['wall_s']:.0f} s; "
        f"training steps {s['train_s']:.0f} s, evals {s['eval_s']:.0f} s; median {s['tokens_per_s']:.0f} tokens/s"
        + (f"; CPU time of the process {s['cpu_s']:.0f} s" if s["cpu_s"] is not None else ""),
        f"- one optimizer step: median {s['step_s_median']:.2f} s, fastest {s['step_s_min']:.2f} s ({s['max_steps']} steps at "
        f"the fastest rate: {s['max_steps'] * s['step_s_min']:.0f} s); the spread is the load of other jobs on the shared cores",
        f"- train loss per assistant token: {s['loss_first']:.3f} at step 1 -> {s['loss_last']:.3f} at step {s['max_steps']}"
        + (f"; held-out loss {s['eval_loss_last']:.3f}" if s["eval_loss_last"] is not None else ""),
        f"- machine: {platform.machine()} Linux, 2 CPU cores shared with other jobs (timings vary with their load); "
        f"commit `{s['git_commit'][:12] or 'unknown'}`",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_section(doc: Path, block: str) -> None:
    text = doc.read_text() if doc.exists() else "# Results\n\n## SFT\n\n"
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        text = pre + block.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybrid_rl.sft.results", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished `hybrid-rl sft` run directory, e.g. runs/sft-quick")
    parser.add_argument("--doc", default=str(Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"))
    args = parser.parse_args(argv)
    block = markdown(summarize_run(args.run_dir))
    write_section(Path(args.doc), block)
    print(block, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

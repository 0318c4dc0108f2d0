"""Figures and the table of ``hybrid-rl bench learning``, from its JSON (never by hand).

    python -m hybrid_rl.benchmarks.plot_learning [--json benchmarks/results/learning.json] [--doc docs/RESULTS.md]
                                                 [--block learning]

Writes ``docs/img/<block>-<env>.png`` (held-out greedy success against RL step, mean +- std over seeds,
with the teacher, the optimal expert and a random policy as horizontal lines) and replaces the block
between ``<!-- <block>:begin -->`` and ``<!-- <block>:end -->`` in docs/RESULTS.md. ``--block`` keeps a
second table apart (e.g. an earlier recipe's JSON as ``learning-previous``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hybrid_rl.benchmarks.record import short_commit

ROOT = Path(__file__).resolve().parents[1]


def markers(block: str = "learning") -> tuple[str, str]:
    return f"<!-- {block}:begin (written by python -m hybrid_rl.benchmarks.plot_learning) -->", f"<!-- {block}:end -->"


BEGIN, END = markers()
NAMES = {"random": "random", "teacher": "teacher", "sft": "SFT", "rl": "RL", "expert": "optimal expert"}


def slug(env_id: str) -> str:
    from hybrid_rl.metrics import env_key

    return env_key(env_id).replace("(", "-").replace(")", "").replace("=", "").replace(";", "-")


def plot_env(env_id: str, data: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    curves = [dict(map(tuple, r["curve"])) for r in data["runs"]]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    ys = np.array([[c[s] for s in steps] for c in curves])
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    if steps:
        mean, std = ys.mean(0), ys.std(0)
        ax.plot(steps, mean, "o-", color="C0", label=f"RL checkpoint (mean of {len(curves)} seeds)")
        ax.fill_between(steps, mean - std, mean + std, color="C0", alpha=0.2, label="+- std over seeds")
    summary = data["summary"]
    for who, color, style in (("teacher", "C1", "--"), ("expert", "C2", ":"), ("random", "C7", "-.")):
        ax.axhline(summary[who]["success"]["mean"], color=color, ls=style, label=f"{NAMES[who]} {summary[who]['success']['mean']:.2f}")
    n = data["runs"][0].get("curve_episodes", "?") if data["runs"] else "?"
    ax.set(xlabel="RL step (0 = the SFT checkpoint)", ylabel=f"held-out greedy success ({n} episodes)", ylim=(-0.02, 1.02),
           title=env_id.replace("hybrid_rl/", ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def env_sets(result: dict) -> list[tuple[str, list[str]]]:
    """The JSON's envs in two sets: the bench's own (its ``bench_envs``, the default ``--envs`` of the code that
    wrote it, in that order), then any further ones run with ``--envs`` (in the JSON's order); an empty set is left
    out. A JSON without ``bench_envs`` (written before it was recorded) is one set, in its own order."""
    if "bench_envs" not in result:
        return [("", list(result["envs"]))]
    bench = [e for e in result["bench_envs"] if e in result["envs"]]
    further = [e for e in result["envs"] if e not in result["bench_envs"]]
    sets = [("The bench's environments (its default `--envs`)", bench),
            ("Further environments, the same recipe (`--envs ...`)", further)]
    return [(title, ids) for title, ids in sets if ids]


def table(result: dict) -> list[str]:
    """Markdown: per env, mean +- standard error over seeds of greedy success (and turns) per policy; the bench's
    own envs and any further ones under headings of their own when the JSON holds both."""
    sets = env_sets(result)
    lines: list[str] = []
    for title, ids in sets:
        if len(sets) > 1:
            lines += [f"{title}:", ""]
        lines += ["| env | seeds | " + " | ".join(NAMES[w] for w in NAMES) + " | RL - SFT | RL - teacher | wall per run |",
                  "|---|---:|" + "---:|" * (len(NAMES) + 3)]
        for env_id in ids:
            s = result["envs"][env_id]["summary"]
            cells = [f"{s[w]['success']['mean']:.2f} +- {s[w]['success']['se']:.2f}" for w in NAMES]
            diffs = [f"{s[d]['mean']:+.2f} +- {s[d]['se']:.2f}" for d in ("rl_minus_sft", "rl_minus_teacher")]
            lines.append(f"| {env_id.replace('hybrid_rl/', '')} | {s['rl']['success']['n']} | " + " | ".join(cells + diffs)
                         + f" | {s['wall_s']['mean']:.0f} s |")
        lines.append("")
    lines += ["Mean turns (greedy, held out):", "",
              "| env | " + " | ".join(NAMES[w] for w in NAMES) + " |", "|---|" + "---:|" * len(NAMES)]
    for _, ids in sets:
        for env_id in ids:
            s = result["envs"][env_id]["summary"]
            lines.append(f"| {env_id.replace('hybrid_rl/', '')} | " + " | ".join(f"{s[w]['turns']['mean']:.2f}" for w in NAMES) + " |")
    return lines


def render(result: dict, img_dir: Path, doc_dir: Path, block: str = "learning",
           json_name: str = "benchmarks/results/learning.json") -> str:
    begin, end = markers(block)
    lines = [begin, "", f"`hybrid-rl bench learning` ({result['config']}"
             + (f", overrides {' '.join(result['overrides'])}" if result["overrides"] else "")
             + (f", commit `{short_commit(result['commit'])}`" if result.get("commit") else "")
             + f"; {result['machine']}): held-out greedy success on {result['episodes']} eval seeds per run, "
             f"mean +- standard error over the run seeds. Per-run figures are in {json_name}.", ""]
    lines += table(result)
    changed = {env_id: data["recipe_changes"] for env_id, data in result["envs"].items() if data.get("recipe_changes")}
    if changed:  # where an env departs from the recipe (bench_learning.RECIPE_CHANGES says why)
        lines += ["", "Recipe changes for one env (everything else is the recipe as it is): "
                  + "; ".join(f"{env_id.replace('hybrid_rl/', '')}: `{' '.join(c)}`" for env_id, c in changed.items())]
    commits = {env_id: sorted({short_commit(r["commit"], 7) for r in data["runs"] if r.get("commit")})
               for env_id, data in result["envs"].items()}
    if any(c and c != [short_commit(result.get("commit", ""), 7)] for c in commits.values()):  # runs of several commits
        lines += ["", "Commit of each env's runs: " + "; ".join(f"{env_id.replace('hybrid_rl/', '')} `{', '.join(c)}`"
                                                            for env_id, c in commits.items() if c)]
    lines.append("")
    for env_id in [e for _, ids in env_sets(result) for e in ids]:
        png = plot_env(env_id, result["envs"][env_id], img_dir / f"{block}-{slug(env_id)}.png")
        lines.append(f"![{env_id}]({png.relative_to(doc_dir).as_posix()})")
    lines += ["", end]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybrid_rl.benchmarks.plot_learning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "learning.json"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "RESULTS.md"))
    parser.add_argument("--block", default="learning", help="the block's name in the doc (and its images' prefix)")
    args = parser.parse_args(argv)
    if not args.block.replace("-", "").isalnum():
        parser.error(f"--block {args.block!r}: letters, digits and '-' only (it names the doc's markers and the PNGs)")
    from hybrid_rl.benchmarks.record import read_json_lines

    result = [r for r in read_json_lines(Path(args.json)) if r.get("benchmark") == "learning"][-1]
    doc = Path(args.doc)
    json_path = Path(args.json).resolve()
    json_name = json_path.relative_to(ROOT).as_posix() if json_path.is_relative_to(ROOT) else json_path.name
    block = render(result, doc.parent / "img", doc.parent, args.block, json_name)
    begin, end = markers(args.block)
    text = doc.read_text() if doc.exists() else "# Results\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n## Learning across environments and seeds\n\n" + block + "\n"
    doc.write_text(text)
    print(f"wrote {doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

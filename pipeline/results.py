"""Write the RL section of docs/RESULTS.md from a pipeline run's own files (never by hand).

    python -m hybrid_rl.pipeline.results runs/quickstart [--doc docs/RESULTS.md]
    python -m hybrid_rl.pipeline.results runs/math-tool --block math-tool --recipe configs/math_tool.yaml

Reads ``results.json`` (the SFT vs RL table on held-out seeds), the RL run's ``metrics.jsonl`` (rollout
success at the first and last steps, step times) and ``config.yaml``; replaces the block between
``<!-- BLOCK:begin -->`` and ``<!-- BLOCK:end -->`` (``--block``, default quickstart; appended under
"## RL" when absent).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import yaml

def markers(block: str) -> tuple[str, str]:
    return f"<!-- {block}:begin (written by python -m hybrid_rl.pipeline.results) -->", f"<!-- {block}:end -->"


def stage_dir(base: Path, recorded: str) -> Path:
    """A stage's run directory: the one inside ``base`` (the pipeline writes every stage there), whatever
    directory the pipeline ran from and this script runs from; the recorded path when there is none."""
    inside = base / Path(recorded).name
    return inside if inside.is_dir() else Path(recorded)


def render(base: Path, block: str = "quickstart", recipe: str = "configs/quickstart.yaml") -> str:
    from hybrid_rl.metrics import env_key, read_metrics, read_run_info

    from hybrid_rl.pipeline.recipe import read_results

    res = read_results(base)
    cfg = yaml.safe_load((base / "config.yaml").read_text())
    rl_dir = stage_dir(base, res["runs"]["rl"])
    rl_rows = [r for r in read_metrics(rl_dir) if "rollout/reward" in r]
    demos = "; ".join(f"{env}: {d['episodes']} episodes of the {d.get('teacher', 'expert')} teacher with noise {d['noise']}, "
                      f"which succeeds {d.get('teacher_success', d.get('expert_success', 0.0)):.2f} on them"
                      for env, d in res["demos"].items())
    algo, train, rollout = cfg["rl"]["algo"], cfg["rl"]["train"], cfg["rl"]["rollout"]
    lines = [
        f"`{base}` (`hybrid-rl pipeline`, {recipe}): a `{cfg['model'].get('preset') or 'custom'}` model; "
        f"demonstrations from an imperfect teacher ({demos}); SFT {cfg['sft']['train']['max_steps']} steps; GRPO "
        f"{train['steps']} steps of {rollout['prompts_per_step']} prompts x {rollout['samples_per_prompt']} samples "
        f"({algo['advantage']} advantages, {algo.get('credit', 'episode')} credit, {algo['policy_loss']} loss, {algo['loss_agg']}, {algo['updates_per_batch']} "
        f"update(s) per batch, lr {train['lr']}, {algo['mode']} rollouts on {rollout['pool']['num_workers']} Ray worker(s)). "
        f"Eval: the SFT and the RL checkpoints on the same {cfg['eval']['episodes_per_env']} held-out seeds per env.",
        "",
    ]
    table, base_rows = res["results"], res.get("baselines", {})
    n = int(cfg["eval"]["episodes_per_env"])
    if base_rows:
        from hybrid_rl.pipeline.recipe import success_se

        lines += ["Held-out greedy success, +- binomial standard error (the scripted policies play the same seeds):", "",
                  "| env | random | teacher | SFT | RL | optimal expert |", "|---|---:|---:|---:|---:|---:|"]
        cell = lambda p: f"{p:.2f} +- {success_se(p, n):.2f}"  # noqa: E731
        for env_id in res["envs"]:
            key = env_key(env_id)
            lines.append(f"| {key} | {cell(base_rows['random'][key]['success'])} | {cell(base_rows['teacher'][key]['success'])} "
                         f"| {cell(table['sft']['T=0'][f'eval/success/{key}'])} | {cell(table['rl']['T=0'][f'eval/success/{key}'])} "
                         f"| {cell(base_rows['expert'][key]['success'])} |")
        lines.append("")
    lines += ["| env | sampling | SFT success | RL success | SFT return | RL return | SFT turns | RL turns |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for env_id in res["envs"]:
        key = env_key(env_id)
        for temp in table["sft"]:
            s, r = table["sft"][temp], table["rl"][temp]
            how = "greedy" if temp == "T=0" else f"sampled ({temp})"
            lines.append(f"| {key} | {how} | {s[f'eval/success/{key}']:.2f} | {r[f'eval/success/{key}']:.2f} | "
                         f"{s[f'eval/return/{key}']:.3f} | {r[f'eval/return/{key}']:.3f} | "
                         f"{s[f'eval/turns/{key}']:.2f} | {r[f'eval/turns/{key}']:.2f} |")
    t = res["time_s"]
    lines += ["", f"- wall time of the whole command: {t['total']:.0f} s (SFT {t['sft']:.0f} s, RL {t['rl']:.0f} s, "
                  f"eval {t['eval']:.0f} s)"]
    if rl_rows:
        first, last = rl_rows[: max(1, len(rl_rows) // 5)], rl_rows[-max(1, len(rl_rows) // 5):]
        mean = lambda rows, k: statistics.mean(r[k] for r in rows if r.get(k) is not None)  # noqa: E731
        lines.append(f"- training rollouts (sampled, train seeds): success {mean(first, 'rollout/success'):.2f} over the "
                     f"first {len(first)} steps -> {mean(last, 'rollout/success'):.2f} over the last {len(last)}; "
                     f"median step {statistics.median(r['perf/step_s'] for r in rl_rows):.1f} s")
    info = read_run_info(rl_dir)
    lines.append(f"- machine: {platform.machine()} {platform.system()}, 2 CPU cores shared with other jobs (timings vary "
                 f"with their load); commit `{str(info.get('git_commit', ''))[:12]}`")
    return "\n".join([markers(block)[0], *lines, markers(block)[1]])


def write(doc: Path, block: str, name: str = "quickstart") -> None:
    """Put ``block`` (rendered for ``name``) between its markers in ``doc``."""
    BEGIN, END = markers(name)
    text = doc.read_text() if doc.exists() else "# Results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        if "\n## RL" not in text:
            text = text.rstrip("\n") + "\n\n## RL\n\n"
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybrid_rl.pipeline.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the pipeline's run directory (with results.json)")
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md")
    parser.add_argument("--block", default="quickstart", help="the name in the page's begin/end markers")
    parser.add_argument("--recipe", default="configs/quickstart.yaml", help="the config the run was made with, as the page names it")
    args = parser.parse_args(argv)
    block = render(args.run, args.block, args.recipe)
    write(args.doc, block, args.block)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())

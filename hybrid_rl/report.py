"""``report.html``: one self-contained page per run (or a comparison of runs) that opens offline.

``build_report(run_dir)`` reads what ``MetricsLogger`` left in the run directory (``metrics.jsonl``,
``samples.jsonl``, ``run.json``, ``config.yaml``) and writes ``run_dir/report.html``. The page opens
with the answer asked first, is it learning: the *learning* section (see ``learning_panels``). Below
it: a plot of every logged series over steps, grouped by section (train, rollout, eval, perf, moe),
the last value of each metric, the run info and config, and sample episodes shown as conversations.
``build_comparison(run_dirs, out)`` draws several runs on the same plots.

The learning section: a headline per environment (one line per run in a comparison) with held-out
success first → last eval and training success and reward as the mean of the first / last
``HEADLINE_WINDOW`` logged steps; then per environment a success plot and a reward plot, each
training step a faint dot under a centered moving average, with every held-out eval point
(``eval/success…``, ``eval/return``) on the same axes as markers joined by a dotted line; then a table of
all those eval points. An SFT run (no ``rollout/`` series) shows ``train/loss`` with ``eval/loss``
instead, and its held-out success per environment.

Plots are matplotlib PNGs embedded as base64; there is no external JS or CSS, so the file can be
mailed or opened from a laptop without network. A few lines of inline script check that every plot
decoded and write the result into ``#report-status`` (tests read it with headless Chromium; see
``check_in_browser``).

Grouping rule: a name with three or more parts is drawn as one line of the plot named by all but its
last part (``eval/success/GuessNumber-v0`` is the ``GuessNumber-v0`` line of ``eval/success``,
``moe/expert_load/layer3/e5`` is the ``e5`` line of ``moe/expert_load/layer3``); a two-part name
that is also such a group is its ``all`` line.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from hybrid_rl.runfiles import METRIC_PREFIXES, read_metrics, read_run_info, read_samples

__all__ = ["build_report", "build_comparison", "load_run", "check_in_browser", "find_chromium", "add_arguments", "run"]

MAX_SAMPLES_SHOWN = 24  # episodes in the page (newest first); all of them stay in samples.jsonl
LINESTYLES = ("-", "--", ":", "-.")  # one per compared run; colours tell the lines of a plot apart


@dataclass
class RunData:
    name: str
    path: Path
    info: dict
    config_text: str
    series: dict[str, tuple[list[int], list[float]]]  # name -> (steps, values), sorted by step
    samples: list[dict] = field(default_factory=list)


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        stages = sorted(str(p.parent) for p in run_dir.glob("*/metrics.jsonl")) if run_dir.is_dir() else []
        hint = (f" Its stages have them (a pipeline's folder): pass one of {', '.join(stages)}, or several to compare them."
                if stages else " It is a `hybrid-rl eval` output (its figures are in eval.json)." if (run_dir / "eval.json").exists()
                else "")
        raise FileNotFoundError(f"{run_dir} holds no metrics.jsonl; pass a run directory written by a hybrid-rl stage "
                                f"(runs/<name>/).{hint}")
    by_key: dict[str, dict[int, float]] = {}
    for row in read_metrics(run_dir):
        step = row.get("step", 0)
        for key, value in row.items():
            if key.startswith(METRIC_PREFIXES):
                by_key.setdefault(key, {})[step] = math.nan if value is None else float(value)  # a resumed step: last wins
    series = {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in by_key.items()}
    info = read_run_info(run_dir)
    config_path = run_dir / "config.yaml"
    return RunData(name=info.get("name") or run_dir.name, path=run_dir, info=info,
                   config_text=config_path.read_text() if config_path.exists() else "",
                   series=series, samples=read_samples(run_dir))


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``run_dir/report.html`` (or ``out``) for one run; returns its path."""
    data = load_run(run_dir)
    out = Path(out) if out else data.path / "report.html"
    return _write(out, render([data], title=f"hybrid-rl run {data.name}"))


def build_comparison(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Draw several runs on the same plots; default path ``<parent of the first run>/compare-<names>.html``."""
    runs = [load_run(d) for d in run_dirs]
    if out is None:
        out = runs[0].path.parent / ("compare-" + "-".join(r.path.name for r in runs) + ".html")
    return _write(Path(out), render(runs, title="hybrid-rl comparison: " + ", ".join(r.name for r in runs)))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------- plotting


def group_series(keys: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Plot name -> [(line label, metric name)], in order of first appearance (see the module docstring)."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for key in keys:
        parts = key.split("/")
        group, label = ("/".join(parts[:-1]), parts[-1]) if len(parts) >= 3 else (key, "")
        groups.setdefault(group, []).append((label, key))
    for lines in groups.values():
        if len(lines) > 1:
            lines[:] = [(label or "all", key) for label, key in lines]
    section = {p.rstrip("/"): i for i, p in enumerate(METRIC_PREFIXES)}
    first = {g: i for i, g in enumerate(groups)}

    def order_key(g: str):
        top = g.split("/")[0]
        # moe plots come per layer: number order (layer2 before layer10); elsewhere the order the stage logs in
        within = tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", g)) if top == "moe" else (first[g],)
        return (section.get(top, len(section)), within)

    order = sorted(groups, key=order_key)
    return {g: groups[g] for g in order}


def _figure(figsize: tuple[float, float], dpi: int):
    """A matplotlib Figure and its axes, without pyplot: the report is written at every logger close, inside
    the user's process, and must not switch that process's backend (a notebook's inline plots) or keep figures."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots()


def plot_png(group: str, lines: list[tuple[str, str]], runs: list[RunData]) -> bytes:
    import matplotlib

    fig, ax = _figure((4.4, 2.8), 90)
    cmap = matplotlib.colormaps["tab10" if len(lines) <= 10 else "tab20"]
    n_drawn = 0
    for r_i, run in enumerate(runs):
        for l_i, (label, key) in enumerate(lines):
            if key not in run.series:
                continue
            steps, values = run.series[key]
            name = " ".join(x for x in ((run.name if len(runs) > 1 else ""), label) if x)
            ax.plot(steps, values, LINESTYLES[r_i % len(LINESTYLES)], color=cmap(l_i % cmap.N), linewidth=1.3,
                    marker="o" if len(steps) <= 20 else None, markersize=3, label=name or None)
            n_drawn += 1
    ax.set_title(group, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if n_drawn > 1 and n_drawn <= 24:
        ax.legend(fontsize=6, ncol=1 if n_drawn <= 6 else 2, loc="best", framealpha=0.7)
    return _png(fig)


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ learning

HEADLINE_WINDOW = 5  # training numbers in the headline: mean of the first / last 5 logged steps
SMOOTH_MAX_WINDOW = 21  # points in the centered moving average of a long series
EVAL_MARKERS = ("s", "^", "D", "v", "P")  # one per held-out series of a plot (greedy, T=1, ...)
EVAL_SUCCESS = re.compile(r"^eval/success[^/]*")  # eval/success, eval/success_t1, ... (+ /<env>)
LABELS = {"rollout/success": "training success", "rollout/reward": "training reward", "train/loss": "train loss",
          "eval/loss": "held-out loss", "eval/return": "held-out return", "eval/success": "held-out success",
          "val/success": "val success (choice of step)"}
NOT_IN_HEADLINE = ("eval/return",)  # drawn on the reward plot; the headline keeps to success and reward


@dataclass
class Panel:
    """One plot of the learning section: a training series (faint points + smoothed line) and held-out eval points."""
    title: str
    env: str  # the environment part of the names ("" for names without one)
    train: str | None  # metric name of the training series
    evals: list[str]  # metric names of the held-out series, drawn as markers on the same axes


def learning_panels(keys: list[str]) -> list[Panel]:
    """The learning plots for these series: per environment, success and reward (RL) or held-out success (SFT).

    Environments are the ``<env>`` parts of ``rollout/success|reward/<env>`` and ``eval/success…/<env>``
    names; with one environment (or none per environment) the two-part means stand in for it. A run
    without ``rollout/`` series (SFT) gets a loss plot (``train/loss`` with ``eval/loss``) first.
    """
    rl = any(k.startswith(("rollout/success", "rollout/reward")) for k in keys)
    success_bases = _unique(EVAL_SUCCESS.match(k).group(0) for k in keys if EVAL_SUCCESS.match(k))
    envs = _unique(k.split("/")[2] for k in keys if len(k.split("/")) == 3
                   and k.rsplit("/", 1)[0] in ("rollout/success", "rollout/reward", *success_bases))
    panels = []
    if not rl:
        panels.append(Panel("loss", "", _pick("train/loss", "", keys), _picks(["eval/loss"], "", keys)))
    for env in envs or [""]:
        name = f" · {env}" if env else ""
        success_evals = _picks(success_bases, env, keys, single=len(envs) <= 1)
        if rl:
            val = _picks(["val/success"], env, keys, len(envs) <= 1)  # eval.select_best's val seeds, beside the held-out ones
            panels.append(Panel("success" + name, env, _pick("rollout/success", env, keys, len(envs) <= 1), success_evals + val))
            panels.append(Panel("reward" + name, env, _pick("rollout/reward", env, keys, len(envs) <= 1),
                                _picks(["eval/return"], env, keys, len(envs) <= 1)))
        else:
            panels.append(Panel("held-out success" + name, env, None, success_evals))
    return [p for p in panels if p.train or p.evals]


def _pick(base: str, env: str, keys: list[str], single: bool = True) -> str | None:
    """``<base>/<env>`` if logged; else ``<base>`` (the mean over environments) when there is only one environment."""
    for key in ([f"{base}/{env}"] if env else []) + ([base] if single else []):
        if key in keys:
            return key
    return None


def _picks(bases: list[str], env: str, keys: list[str], single: bool = True) -> list[str]:
    return [k for k in (_pick(b, env, keys, single) for b in bases) if k]


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))


def label(key: str) -> str:
    """What a learning series is, in words: ``eval/success_t1/Wordle-v0`` -> ``held-out success (T=1)``."""
    base = "/".join(key.split("/")[:2])
    temp = re.fullmatch(r"eval/success_t(.+)", base)
    return f"held-out success (T={temp.group(1)})" if temp else LABELS.get(base, base)


def finite(series: tuple[list[int], list[float]]) -> tuple[list[int], list[float]]:
    """The points of a series that hold a number (``null`` in metrics.jsonl is NaN here)."""
    pairs = [(s, v) for s, v in zip(*series) if not math.isnan(v)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def smooth_window(n: int) -> int:
    """Points in the centered moving average of an ``n``-point series: odd, about n/10, none (1) under 10 points."""
    return 1 if n < 10 else min(SMOOTH_MAX_WINDOW, 2 * (n // 20) + 3)


def centered_mean(values: list[float], window: int) -> list[float]:
    """Centered moving average over ``window`` points; the window is cut short at the ends of the series."""
    half = window // 2
    spans = [values[max(0, i - half):i + half + 1] for i in range(len(values))]
    return [sum(span) / len(span) for span in spans]


@dataclass
class Drawn:
    png: bytes
    eval_points: int  # held-out points drawn (all runs)
    windows: set[int]  # moving-average windows used


def learning_png(panel: Panel, runs: list[RunData]) -> Drawn:
    """Draw one learning panel: per run, the training series raw and smoothed, and every held-out point."""
    fig, ax = _figure((5.6, 3.4), 90)
    many = len(runs) > 1
    eval_points, windows = 0, set()
    for r_i, run in enumerate(runs):
        prefix = f"{run.name} " if many else ""
        if panel.train in run.series:
            steps, values = finite(run.series[panel.train])
            window = smooth_window(len(steps))
            windows.add(window)
            color = f"C{r_i % 10}" if many else "C0"
            ax.plot(steps, values, ".", color=color, alpha=0.3, markersize=4)
            ax.plot(steps, centered_mean(values, window), LINESTYLES[r_i % len(LINESTYLES)], color=color, linewidth=1.6,
                    label=prefix + label(panel.train))
        for e_i, key in enumerate(k for k in panel.evals if k in run.series):
            steps, values = finite(run.series[key])
            color = f"C{r_i % 10}" if many else f"C{(1 + e_i) % 10}"
            ax.plot(steps, values, ":", marker=EVAL_MARKERS[e_i % len(EVAL_MARKERS)], color=color, markersize=6,
                    markeredgecolor="black", markeredgewidth=0.6, linewidth=1.2, zorder=3, label=prefix + label(key))
            eval_points += len(steps)
    ax.set_title(panel.title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="best", framealpha=0.7)
    return Drawn(_png(fig), eval_points, windows)


def headline_lines(panels: list[Panel], runs: list[RunData]) -> list[str]:
    """One line per environment (per run when comparing runs): held-out and training numbers, first → last."""
    lines = []
    for run in runs:
        per_env = []
        for env in _unique(p.env for p in panels):
            parts = [part for p in panels if p.env == env for part in _panel_numbers(p, run)]
            if parts:
                per_env.append((f"{env}: " if env else "") + "; ".join(parts))
        if len(runs) > 1:
            lines.append(f"{run.name}: " + (" | ".join(per_env) or "no learning series"))
        elif per_env:
            lines += per_env
    return lines


def _panel_numbers(panel: Panel, run: RunData) -> list[str]:
    parts = [_eval_change(key, finite(run.series[key])) for key in panel.evals
             if key in run.series and not key.startswith(NOT_IN_HEADLINE)]
    if panel.train in run.series:
        parts.append(_train_change(panel.train, finite(run.series[panel.train])))
    return [p for p in parts if p]


def _eval_change(key: str, series: tuple[list[int], list[float]]) -> str:
    """``held-out success 0.39 → 0.52 (step 0 → 40, 3 evals)``: first and last held-out point."""
    steps, values = series
    if not steps:
        return ""
    if len(steps) == 1:
        return f"{label(key)} {_num(key, values[0])} (step {steps[0]} only)"
    return f"{label(key)} {_num(key, values[0])} → {_num(key, values[-1])} (step {steps[0]} → {steps[-1]}, {len(steps)} evals)"


def _train_change(key: str, series: tuple[list[int], list[float]]) -> str:
    """``training success 0.45 → 0.60 (mean of first / last 5 logged steps)``: the two windows never overlap."""
    steps, values = series
    if not steps:
        return ""
    if len(steps) == 1:
        return f"{label(key)} {_num(key, values[0])} (step {steps[0]} only)"
    k = min(HEADLINE_WINDOW, len(steps) // 2)
    first, last = sum(values[:k]) / k, sum(values[-k:]) / k
    return f"{label(key)} {_num(key, first)} → {_num(key, last)} (mean of first / last {k} logged steps)"


def _num(key: str, v: float) -> str:
    """Success rates with two decimals (0.50), anything else with 3 significant digits."""
    return f"{v:.2f}" if "success" in key else f"{v:.3g}"


# ------------------------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;padding:0 1.5rem 2rem;color:#1d1d1f;background:#fafafa}
h1{font-size:1.4rem;margin:1.2rem 0 .3rem}h2{font-size:1.1rem;margin:1.6rem 0 .5rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
nav a{margin-right:1rem;color:#0b63c5;text-decoration:none}
.plots{display:flex;flex-wrap:wrap;gap:.6rem}.plots figure{margin:0;background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:4px}
.plots img{display:block;width:396px;height:252px}.plots.learning img{width:504px;height:306px}
ul.headline{font-size:1rem;font-weight:600;margin:.4rem 0 .8rem;padding-left:1.2rem}p.caption{font-size:.8rem;color:#555;max-width:60rem}
table{border-collapse:collapse;font-size:.85rem;background:#fff}td,th{border:1px solid #e3e3e3;padding:.2rem .5rem;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:.6rem;font-size:.8rem;overflow:auto;max-height:32rem}
details.episode{background:#fff;border:1px solid #e3e3e3;border-radius:6px;margin:.5rem 0;padding:.4rem .7rem}
details.episode summary{cursor:pointer;font-size:.9rem}
.msg{margin:.35rem 0;padding:.4rem .6rem;border-radius:8px;white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.8rem;max-width:52rem}
.msg .role{display:block;font-family:system-ui,sans-serif;font-size:.7rem;font-weight:600;text-transform:uppercase;color:#666;margin-bottom:.15rem}
.msg.system{background:#f0f0f0}.msg.user{background:#e8f0fe}.msg.tool{background:#fff4e0}.msg.assistant{background:#e6f4ea;margin-left:2rem}
#report-status{margin-top:2rem;font-size:.75rem;color:#888}
"""

# Runs before anything else so that a script error anywhere in the page is counted (bubbling phase
# only: a broken <img> is counted by the status script, not here).
HEAD_SCRIPT = "window.__reportErrors=[];window.addEventListener('error',function(e){window.__reportErrors.push(String(e.message))});"

# After load: every <img> decoded with a size, and no script error -> data-status="ok".
STATUS_SCRIPT = """
window.addEventListener('load',function(){
  var imgs=Array.prototype.slice.call(document.images);
  var broken=imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0)});
  var s=document.getElementById('report-status');
  s.setAttribute('data-images',imgs.length);s.setAttribute('data-broken',broken.length);
  s.setAttribute('data-errors',window.__reportErrors.length);
  s.setAttribute('data-status',(broken.length||window.__reportErrors.length)?'error':'ok');
  s.textContent=imgs.length+' plots rendered, '+broken.length+' broken, '+window.__reportErrors.length+' script errors';
});
"""


def render(runs: list[RunData], title: str) -> str:
    esc = html.escape
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.series if k not in keys]
    groups = group_series(keys)
    sections: dict[str, list[str]] = {}
    for group, lines in groups.items():
        png = base64.b64encode(plot_png(group, lines, runs)).decode("ascii")
        sections.setdefault(group.split("/")[0], []).append(
            f'<figure><img alt="{esc(group)}" title="{esc(group)}" src="data:image/png;base64,{png}"></figure>')
    panels = learning_panels(keys)
    body = [f"<h1>{esc(title)}</h1>",
            f"<p>built {time.strftime('%Y-%m-%d %H:%M:%S')} · {len(keys)} series · {len(panels) + len(groups)} plots</p>"]
    body.append('<nav><a href="#learning">learning</a>' + "".join(f'<a href="#{s}">{s}</a>' for s in sections)
                + '<a href="#summary">summary</a><a href="#runs">runs &amp; config</a><a href="#samples">samples</a></nav>')
    body.append(_learning_section(panels, runs))
    if not groups:
        body.append("<p>No metrics logged yet.</p>")
    for section, figs in sections.items():
        body.append(f'<h2 id="{esc(section)}">{esc(section)}</h2><div class="plots">{"".join(figs)}</div>')
    ordered = [key for lines in groups.values() for _, key in lines]
    body.append('<h2 id="summary">last values</h2>' + _summary_table(ordered, runs))
    body.append('<h2 id="runs">runs &amp; config</h2>' + "".join(_run_block(r, len(runs) > 1) for r in runs))
    body.append('<h2 id="samples">sample episodes</h2>' + "".join(_samples_block(r, len(runs) > 1) for r in runs))
    body.append('<div id="report-status" data-status="pending">checking plots…</div>')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style><script>{HEAD_SCRIPT}</script></head><body>{''.join(body)}"
            f"<script>{STATUS_SCRIPT}</script></body></html>\n")


def _learning_section(panels: list[Panel], runs: list[RunData]) -> str:
    """Headline, learning plots with their caption, and the table of held-out eval points."""
    head = '<h2 id="learning">learning</h2>'
    if not panels:
        return head + "<p>No reward, success, loss or held-out eval series logged yet.</p>"
    lines = headline_lines(panels, runs)
    headline = '<ul class="headline">' + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>" if lines else ""
    figs, windows = [], set()
    for panel in panels:
        drawn = learning_png(panel, runs)
        windows |= drawn.windows
        png = base64.b64encode(drawn.png).decode("ascii")
        alt = html.escape(f"learning: {panel.title}")
        figs.append(f'<figure data-panel="{html.escape(panel.title)}" data-eval-points="{drawn.eval_points}">'
                    f'<img alt="{alt}" title="{alt}" src="data:image/png;base64,{png}"></figure>')
    return (head + headline + f'<div class="plots learning">{"".join(figs)}</div>'
            + f'<p class="caption">{_caption(windows)}</p>' + _eval_points_table(panels, runs))


def _caption(windows: set[int]) -> str:
    smoothed = sorted(w for w in windows if w > 1)
    how = ("none: fewer than 10 points" if not smoothed else f"{smoothed[0]} points" if len(smoothed) == 1
           else f"{smoothed[0]}–{smoothed[-1]} points, wider for longer series")
    return ("Faint dots: the training series at each logged step; solid line: its centered moving average "
            f"(window {how}; cut short at the ends of the run). Markers joined by a dotted line: every held-out eval point "
            f"logged (the legend names each series). Headline training numbers: mean of the first / last "
            f"{HEADLINE_WINDOW} logged steps (fewer when the run is short); held-out: first → last eval.")


def _eval_points_table(panels: list[Panel], runs: list[RunData]) -> str:
    """Every held-out point of the learning plots, as numbers: one row per run and series."""
    keys = _unique(k for p in panels for k in p.evals)
    rows = []
    for run in runs:
        for key in keys:
            steps, values = finite(run.series.get(key, ([], [])))
            if steps:
                points = " · ".join(f"{s}: {_num(key, v)}" for s, v in zip(steps, values))
                run_cell = f"<td>{html.escape(run.name)}</td>" if len(runs) > 1 else ""
                rows.append(f'<tr data-series="{html.escape(key)}" data-steps="{",".join(map(str, steps))}">{run_cell}'
                            f'<td>{html.escape(key)}</td><td class="num">{len(steps)}</td><td>{points}</td></tr>')
    if not rows:
        return "<p>No held-out eval points logged.</p>"
    run_head = "<th>run</th>" if len(runs) > 1 else ""
    return (f'<table class="eval-points"><tr>{run_head}<th>held-out series</th><th>points</th><th>step: value</th></tr>'
            + "".join(rows) + "</table>")


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    return f"{v:.4g}"


def _summary_table(keys: list[str], runs: list[RunData]) -> str:
    head = "<tr><th>metric</th>" + "".join(f"<th>{html.escape(r.name)} (step)</th>" for r in runs) + "</tr>"
    rows = []
    for key in keys:
        cells = []
        for r in runs:
            steps, values = r.series.get(key, ([], []))
            cells.append(f'<td class="num">{_fmt(values[-1])} ({steps[-1]})</td>' if steps else "<td></td>")
        rows.append(f"<tr><td>{html.escape(key)}</td>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _run_block(run: RunData, named: bool) -> str:
    info = run.info
    fields = [("directory", str(run.path)), ("group", info.get("group", "")), ("tags", ", ".join(info.get("tags", []))),
              ("git commit", info.get("git_commit", "")), ("backends", ", ".join(info.get("backends", []))),
              ("started", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if info.get("started") else ""),
              ("wandb", f"{info.get('wandb_mode', '')} {info.get('wandb_dir', '')}".strip())]
    rows = "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in fields if v)
    head = f"<h3>{html.escape(run.name)}</h3>" if named else ""
    config = html.escape(run.config_text) if run.config_text else "(no config.yaml in the run directory)"
    return f"{head}<table>{rows}</table><pre>{config}</pre>"


def _samples_block(run: RunData, named: bool) -> str:
    head = f"<h3>{html.escape(run.name)}</h3>" if named else ""
    if not run.samples:
        return head + "<p>No sample episodes logged.</p>"
    shown = list(reversed(run.samples))[:MAX_SAMPLES_SHOWN]
    note = f"<p>newest {len(shown)} of {len(run.samples)} episodes (all of them are in samples.jsonl)</p>"
    return head + note + "".join(_episode(row, open_=(i == 0)) for i, row in enumerate(shown))


def _episode(row: dict, open_: bool) -> str:
    esc = html.escape
    fields = " · ".join(f"{esc(str(k))}={esc(_short(v))}" for k, v in row.items() if k != "messages")
    msgs = []
    for m in row.get("messages") or []:
        if not isinstance(m, dict):
            continue
        role = str(m.get("role", "?"))
        css = role if role in ("system", "user", "assistant", "tool") else "user"
        msgs.append(f'<div class="msg {css}"><span class="role">{esc(role)}</span>{esc(str(m.get("content", "")))}</div>')
    return f'<details class="episode"{" open" if open_ else ""}><summary>{fields}</summary>{"".join(msgs) or "<p>(no messages)</p>"}</details>'


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------------- browser


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class BrowserCheck:
    status: str  # "ok", "error" or "pending" (the status script never ran)
    images: int
    broken: int
    errors: int
    console_errors: list[str]  # "Uncaught ..." lines chromium logged
    screenshot: Path | None


def check_in_browser(html_path: str | Path, screenshot: str | Path | None = None, timeout_s: int = 120) -> BrowserCheck:
    """Open ``html_path`` in headless Chromium; read ``#report-status`` from the DOM and optionally save a screenshot."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found; install it with `apt-get install -y chromium` (Debian/Ubuntu).")
    url = Path(html_path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="hybrid-rl-chromium-") as profile:
        base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}",
                "--virtual-time-budget=10000"]
        env = {**os.environ, "HOME": profile}  # chromium writes crash-pad and font caches under HOME
        dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=timeout_s, env=env)
        if dom.returncode != 0 or "<html" not in dom.stdout:
            raise RuntimeError(f"chromium --dump-dom failed ({dom.returncode}): {dom.stderr.strip()[-800:]}")
        shot = None
        if screenshot is not None:
            shot = Path(screenshot).resolve()
            shot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(base + ["--window-size=1400,2200", "--hide-scrollbars", f"--screenshot={shot}", url],
                           capture_output=True, text=True, timeout=timeout_s, env=env)
            shot = shot if shot.exists() else None
    tag = re.search(r'<div id="report-status"[^>]*>', dom.stdout)
    attrs = dict(re.findall(r'data-([a-z]+)="([^"]*)"', tag.group(0))) if tag else {}
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]
    return BrowserCheck(status=attrs.get("status", "missing"), images=int(attrs.get("images", 0)), broken=int(attrs.get("broken", 0)),
                        errors=int(attrs.get("errors", 0)), console_errors=console, screenshot=shot)


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run directories (runs/<name>); one rebuilds its report.html, several are compared")
    parser.add_argument("--out", default=None, help="where to write the HTML (default: RUN/report.html for one run, "
                                                      "<parent>/compare-<names>.html for several)")


def run(args: argparse.Namespace) -> int:
    if len(args.runs) == 1:
        path = build_report(args.runs[0], args.out)
    else:
        path = build_comparison(args.runs, args.out)
    print(path)
    return 0

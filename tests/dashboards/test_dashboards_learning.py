"""report.html opens with the learning section: headline numbers, smoothed training curves, every held-out eval point."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest

from hybrid_rl.metrics import env_key
from hybrid_rl.report import build_comparison, build_report, centered_mean, learning_panels, smooth_window

GUESS, WORDLE = env_key("hybrid_rl/GuessNumber-v0"), env_key("hybrid_rl/Wordle-v0")


def write_run(run_dir: Path, rows: list[dict]) -> Path:
    """A run directory holding only ``metrics.jsonl`` rows, as ``MetricsLogger`` writes them."""
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({"time": 0.0, **row}) + "\n")
    return run_dir


def rl_rows() -> list[dict]:
    """20 RL steps on two envs; held-out eval of GuessNumber at steps 0, 10, 20 (T=1 only at 0 and 20), Wordle at 0."""
    rows = [{"step": 0, f"eval/success/{GUESS}": 0.25, f"eval/success_t1/{GUESS}": 0.2, f"eval/return/{GUESS}": 0.3,
             f"eval/success/{WORDLE}": 0.05, "eval/success": 0.15}]
    for step in range(1, 21):
        success = 0.3 + 0.02 * (step - 1)  # first 5 steps: mean 0.34; last 5: 0.64
        row = {"step": step, f"rollout/success/{GUESS}": success, f"rollout/reward/{GUESS}": 2 * success,
               f"rollout/success/{WORDLE}": None if step == 3 else 0.1, f"rollout/reward/{WORDLE}": -1.0,
               "rollout/reward": success - 0.5, "rollout/success": success / 2,
               "train/loss": 1.0 / step, "train/staleness_mean": 0.5, "perf/step_s": 1.0}
        if step == 10:
            row |= {f"eval/success/{GUESS}": 0.4, f"eval/return/{GUESS}": 0.5}
        if step == 20:
            row |= {f"eval/success/{GUESS}": 0.5, f"eval/success_t1/{GUESS}": 0.45, f"eval/return/{GUESS}": 0.7}
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def rl_page(tmp_path_factory) -> str:
    run = write_run(tmp_path_factory.mktemp("runs") / "rl", rl_rows())
    return build_report(run).read_text()


def _h2_ids(page: str) -> list[str]:
    return re.findall(r'<h2 id="([^"]+)"', page)


def _headline(page: str) -> list[str]:
    block = re.search(r'<ul class="headline">(.*?)</ul>', page).group(1)
    return [html.unescape(li) for li in re.findall(r"<li>(.*?)</li>", block)]


def test_learning_section_comes_before_every_diagnostic(rl_page):
    assert _h2_ids(rl_page)[0] == "learning"
    assert re.search(r"<nav><a href=\"#learning\">", rl_page)
    alts = re.findall(r'<img alt="([^"]+)"', rl_page)
    assert alts[:4] == [f"learning: success · {GUESS}", f"learning: reward · {GUESS}",
                        f"learning: success · {WORDLE}", f"learning: reward · {WORDLE}"]
    assert not any(a.startswith("learning: ") for a in alts[4:])
    learning_end = rl_page.index('<h2 id="train">')
    assert rl_page.index('<ul class="headline">') < rl_page.index('alt="learning: ') < learning_end
    assert rl_page.index('alt="train/staleness_mean"') > learning_end  # diagnostics still there, below
    assert "centered moving average" in rl_page


def test_headline_gives_held_out_and_training_numbers_per_env(rl_page):
    assert _headline(rl_page) == [
        f"{GUESS}: held-out success 0.25 → 0.50 (step 0 → 20, 3 evals); "
        "held-out success (T=1) 0.20 → 0.45 (step 0 → 20, 2 evals); "
        "training success 0.34 → 0.64 (mean of first / last 5 logged steps); "
        "training reward 0.68 → 1.28 (mean of first / last 5 logged steps)",
        f"{WORDLE}: held-out success 0.05 (step 0 only); "  # a null step is skipped, not averaged as NaN
        "training success 0.10 → 0.10 (mean of first / last 5 logged steps); "
        "training reward -1 → -1 (mean of first / last 5 logged steps)",
    ]


def test_every_held_out_point_is_drawn_and_listed(rl_page):
    figures = dict(re.findall(r'<figure data-panel="([^"]+)" data-eval-points="(\d+)">', rl_page))
    assert figures == {f"success · {GUESS}": "5", f"reward · {GUESS}": "3", f"success · {WORDLE}": "1", f"reward · {WORDLE}": "0"}
    table = re.search(r'<table class="eval-points">(.*?)</table>', rl_page).group(1)
    rows = dict(re.findall(r'<tr data-series="([^"]+)" data-steps="([^"]*)">', table))
    assert rows == {f"eval/success/{GUESS}": "0,10,20", f"eval/success_t1/{GUESS}": "0,20",
                    f"eval/return/{GUESS}": "0,10,20", f"eval/success/{WORDLE}": "0"}
    assert "0: 0.25 · 10: 0.40 · 20: 0.50" in table


def test_one_env_without_per_env_names_uses_the_means(tmp_path):
    rows = [{"step": s, "rollout/success": 0.5, "rollout/reward": 1.0} for s in range(1, 4)]
    rows[0] |= {"eval/success": 0.1}
    rows[-1] |= {"eval/success": 0.3}
    page = build_report(write_run(tmp_path / "one", rows)).read_text()
    assert _headline(page) == ["held-out success 0.10 → 0.30 (step 1 → 3, 2 evals); "
                               "training success 0.50 → 0.50 (mean of first / last 1 logged steps); "
                               "training reward 1 → 1 (mean of first / last 1 logged steps)"]


def test_sft_run_leads_with_loss_and_held_out_success(tmp_path):
    rows = [{"step": s, "train/loss": 3.0 - 0.1 * s, "train/lr": 1e-3} for s in range(1, 13)]
    rows[3] |= {"eval/loss": 2.5, f"eval/success/{GUESS}": 0.0}
    rows[11] |= {"eval/loss": 1.5, f"eval/success/{GUESS}": 0.75}
    page = build_report(write_run(tmp_path / "sft", rows)).read_text()
    assert _h2_ids(page)[:2] == ["learning", "train"]
    assert _headline(page) == ["held-out loss 2.5 → 1.5 (step 4 → 12, 2 evals); "
                               "train loss 2.7 → 2 (mean of first / last 5 logged steps)",
                               f"{GUESS}: held-out success 0.00 → 0.75 (step 4 → 12, 2 evals)"]
    assert re.findall(r'<figure data-panel="([^"]+)" data-eval-points="(\d+)">', page) == [
        ("loss", "2"), (f"held-out success · {GUESS}", "2")]


def test_comparison_leads_with_one_headline_line_per_run(tmp_path):
    a = write_run(tmp_path / "a", rl_rows())
    b = write_run(tmp_path / "b", [{"step": s, f"rollout/success/{GUESS}": 0.2, f"rollout/reward/{GUESS}": 0.1} for s in (1, 2)])
    page = build_comparison([a, b]).read_text()
    assert _h2_ids(page)[0] == "learning"
    lines = _headline(page)
    assert len(lines) == 2 and lines[0].startswith(f"a: {GUESS}: held-out success 0.25 → 0.50") and f" | {WORDLE}: " in lines[0]
    assert lines[1] == (f"b: {GUESS}: training success 0.20 → 0.20 (mean of first / last 1 logged steps); "
                        "training reward 0.1 → 0.1 (mean of first / last 1 logged steps)")
    assert '<th>run</th><th>held-out series</th>' in page  # eval points table names the run of each row


def test_no_learning_series_says_so(tmp_path):
    page = build_report(write_run(tmp_path / "perf", [{"step": 1, "perf/step_s": 1.0}])).read_text()
    assert _h2_ids(page)[0] == "learning" and "No reward, success, loss or held-out eval series logged yet." in page


def test_smoothing_is_a_centered_moving_average_cut_short_at_the_ends():
    assert centered_mean([0.0, 0.0, 3.0, 0.0, 0.0], 3) == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert centered_mean([1.0, 2.0], 1) == [1.0, 2.0]
    assert [smooth_window(n) for n in (5, 9, 10, 40, 100, 1000)] == [1, 1, 3, 7, 13, 21]


def test_panels_follow_env_key_names():
    keys = [f"rollout/success/{GUESS}", f"rollout/reward/{GUESS}", "rollout/success", f"eval/success_t1/{GUESS}"]
    [success, reward] = learning_panels(keys)
    assert (success.train, success.evals, reward.train, reward.evals) == (
        f"rollout/success/{GUESS}", [f"eval/success_t1/{GUESS}"], f"rollout/reward/{GUESS}", [])


def test_val_success_of_select_best_is_drawn_beside_the_held_out_points():
    keys = [f"rollout/success/{GUESS}", f"rollout/reward/{GUESS}", f"eval/success/{GUESS}", f"val/success/{GUESS}", "val/success"]
    [success, _] = learning_panels(keys)
    assert success.evals == [f"eval/success/{GUESS}", f"val/success/{GUESS}"]


def test_building_a_report_leaves_the_processs_matplotlib_alone(tmp_path):
    """The report is built at every logger close, inside the user's process (a notebook): it draws without pyplot,
    so the process keeps its backend (e.g. inline plots) and no figure of the report stays open."""
    import subprocess
    import sys

    run = write_run(tmp_path / "rl", rl_rows())
    script = (f"import matplotlib, sys; matplotlib.use('svg'); from hybrid_rl.report import build_report; "
              f"build_report({str(run)!r}); print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["svg", "False"]
    assert (run / "report.html").read_text().count("data:image/png;base64,") >= 2

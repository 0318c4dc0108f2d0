"""report.html: plots of every series, config, conversations; opens offline in headless Chromium."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import pytest
from dashboard_jobs import short_job

from hybrid_rl.cli import main
from hybrid_rl.metrics import LoggingConfig
from hybrid_rl.report import build_report, check_in_browser, find_chromium, group_series

# an SFT-like job: the learning section leads with loss and held-out success per env (test_dashboards_learning.py)
LEARNING = ["learning: loss", "learning: held-out success · GuessNumber-v0", "learning: held-out success · Wordle-v0"]
N_PLOTS = len(LEARNING) + 11
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboards"
CHROMIUM_INSTALL = "apt-get update && apt-get install -y chromium"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short jsonl-only runs (the report reads only the run directory)."""
    root = tmp_path_factory.mktemp("runs")
    for name, steps in (("alpha", 12), ("beta", 8)):
        short_job(root / name, LoggingConfig(backends=["jsonl"], report=False), steps=steps)
    return root


def _imgs(page: str) -> list[tuple[str, bytes]]:
    return [(alt, base64.b64decode(data)) for alt, data in re.findall(r'<img alt="([^"]+)"[^>]*src="data:image/png;base64,([^"]+)"', page)]


def test_every_series_is_plotted_in_one_self_contained_page(runs):
    path = build_report(runs / "alpha")
    page = path.read_text()
    assert path == runs / "alpha" / "report.html"
    imgs = _imgs(page)
    assert [alt for alt, _ in imgs] == LEARNING + ["train/loss", "train/lr", "train/grad_norm", "eval/success", "eval/return",
                                        "eval/turns", "eval/env_errors", "eval/timeouts", "perf/tokens_per_s",
                                        "moe/expert_load/layer1", "moe/expert_load/layer3"]
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000 for _, png in imgs)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from the network
    assert "preset: micro" in page and "group" in page and "dash" in page  # config and run info


def test_sample_episodes_show_as_escaped_conversations(runs):
    page = build_report(runs / "alpha").read_text()
    assert page.count('class="episode"') == 9
    assert '<div class="msg assistant"><span class="role">assistant</span>50</div>' in page
    assert "&lt;rules&gt; &amp; more" in page and "<rules>" not in page


def test_grouping_puts_per_env_and_per_expert_series_on_one_plot():
    groups = group_series(["train/loss", "eval/success/A", "eval/success", "moe/expert_load/layer10/e0",
                           "moe/expert_load/layer2/e0", "moe/expert_load/layer2/e1"])
    assert groups == {"train/loss": [("", "train/loss")],
                      "eval/success": [("A", "eval/success/A"), ("all", "eval/success")],
                      "moe/expert_load/layer2": [("e0", "moe/expert_load/layer2/e0"), ("e1", "moe/expert_load/layer2/e1")],
                      "moe/expert_load/layer10": [("e0", "moe/expert_load/layer10/e0")]}


def test_cli_rebuilds_one_report_and_compares_runs(runs, capsys):
    (runs / "alpha" / "report.html").unlink(missing_ok=True)
    assert main(["report", str(runs / "alpha")]) == 0
    assert (runs / "alpha" / "report.html").exists()
    assert main(["report", str(runs / "alpha"), str(runs / "beta")]) == 0
    default = runs / "compare-alpha-beta.html"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(default)
    page = default.read_text()
    assert len(_imgs(page)) == N_PLOTS and "<th>alpha (step)</th><th>beta (step)</th>" in page
    out = runs / "elsewhere" / "cmp.html"
    assert main(["report", str(runs / "alpha"), str(runs / "beta"), "--out", str(out)]) == 0 and out.exists()


def test_cli_names_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    for stage in ("rl", "sft"):  # a pipeline's folder: the error names its stages' run directories
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text("")
    assert main(["report", str(tmp_path)]) == 2
    assert f"pass one of {tmp_path / 'rl'}, {tmp_path / 'sft'}" in capsys.readouterr().err


def test_report_renders_in_headless_chromium(runs):
    if find_chromium() is None:
        message = f"Chromium is needed to check report.html in a browser; install it with `{CHROMIUM_INSTALL}`."
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    path = build_report(runs / "alpha")
    check = check_in_browser(path, screenshot=ARTIFACTS / "report.png")
    assert (check.status, check.images, check.broken, check.errors, check.console_errors) == ("ok", N_PLOTS, 0, 0, [])
    assert check.screenshot is not None and check.screenshot.stat().st_size > 10_000

    broken = path.with_name("broken.html")  # the check itself catches a broken plot and a script error
    broken.write_text(path.read_text().replace("base64,iVBOR", "base64,AAAA", 1).replace("</body>", "<script>nope(</script></body>"))
    check = check_in_browser(broken)
    assert (check.status, check.broken, check.errors) == ("error", 1, 1)

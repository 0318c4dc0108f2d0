"""MetricsLogger: every backend gets the same run, read back with each tool's own reader; failures stay local."""

from __future__ import annotations

import json
import sys
import time
import types
import warnings

import pytest
from dashboard_jobs import CONFIG, short_job

from hybrid_rl.config import ConfigError, load_config
from hybrid_rl.metrics import (LoggingConfig, MetricsLogger, read_metrics, read_run_info, read_samples,
                               read_tensorboard_scalars, read_wandb_offline_run, resolve_wandb_mode)

QUIET = dict(report=False)  # report.html has its own tests; skipping it keeps these fast


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One short job with all four backends, wandb offline."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logged = short_job(run_dir, LoggingConfig(console_every=4))
    mp.undo()
    return run_dir, logged, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_short_job_runs_every_backend_without_warnings(full_run):
    run_dir, _, runtime_warnings = full_run
    assert runtime_warnings == []
    info = read_run_info(run_dir)
    assert info["backends"] == ["jsonl", "console", "tensorboard", "wandb"]
    assert info["wandb_mode"] == "offline"
    assert (run_dir / "report.html").exists()  # rebuilt at close()


def test_jsonl_holds_every_logged_value(full_run):
    run_dir, logged, _ = full_run
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in logged]
    for row, want in zip(rows, logged):
        assert {k: v for k, v in row.items() if k != "time"} == pytest.approx(want)


def test_wandb_offline_run_holds_history_config_and_run_info(full_run):
    run_dir, logged, _ = full_run
    wb = read_wandb_offline_run(run_dir)
    assert wb.path.is_relative_to(run_dir / "wandb")  # files in the run directory: `wandb sync` finds them there
    assert (wb.name, wb.group, wb.project) == ("full", "dash", "hybrid-rl")
    assert wb.tags == ["test", "tiny"]
    assert {k: wb.config[k] for k in CONFIG} == CONFIG
    assert wb.config["git_commit"] == read_run_info(run_dir)["git_commit"] != ""
    by_step = {h["_step"]: h for h in wb.history}
    assert sorted(by_step) == [r["step"] for r in logged]
    for want in logged:
        got = by_step[want["step"]]
        assert {k: got[k] for k in want if k != "step"} == pytest.approx({k: v for k, v in want.items() if k != "step"})
    samples = [h for h in wb.history if "samples/episodes.nrows" in h]
    assert [h["samples/episodes.nrows"] for h in samples] == [3, 3, 3]


def test_tensorboard_holds_the_same_scalars(full_run):
    run_dir, logged, _ = full_run
    scalars = read_tensorboard_scalars(run_dir)
    keys = {k for row in logged for k in row if k != "step"}
    assert set(scalars) == keys
    for key in keys:
        want = [(r["step"], r[key]) for r in logged if key in r]
        assert [s for s, _ in scalars[key]] == [s for s, _ in want]
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in want], rel=1e-6)  # stored as float32


def test_samples_are_kept_with_their_step(full_run):
    run_dir, _, _ = full_run
    samples = read_samples(run_dir)
    assert [s["step"] for s in samples] == [3, 3, 3, 7, 7, 7, 11, 11, 11]
    assert samples[0]["messages"][2] == {"role": "assistant", "content": "50"}


def test_console_prints_a_line_every_n_steps_and_at_each_eval(tmp_path, capsys, monkeypatch):
    import hybrid_rl.log

    monkeypatch.setattr(hybrid_rl.log, "_QUIET", False)  # an earlier test's quiet run must not silence this one
    monkeypatch.delenv("HYBRID_RL_QUIET", raising=False)
    log = MetricsLogger(LoggingConfig(backends=["console"], console_every=5, **QUIET), tmp_path / "c")
    for step in range(12):
        log.log({"train/loss": 1.5, "moe/expert_load/layer1/e0": 0.2}, step)
    log.log({"eval/success": 0.5}, 13)
    log.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step")]
    assert [int(line.split()[1]) for line in lines] == [0, 5, 10, 13]
    assert "train/loss 1.5" in lines[0] and "moe/" not in lines[0]


def test_metrics_jsonl_is_flushed_line_by_line(tmp_path):
    log = MetricsLogger(LoggingConfig(backends=["jsonl"], **QUIET), tmp_path / "r")
    log.log({"train/loss": 1.0}, 0)
    log.log({"train/loss": float("nan"), "train/tokens": 7}, 1)
    # another process (a crash right now) sees both lines before close()
    assert [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()][1]["train/loss"] is None
    log.close()
    with (tmp_path / "r" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "train/lo')  # a torn last line, as a crash mid-write leaves it
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == [0, 1]
    # the run resumes: the torn row is cut off, not left in the middle of the file where no reader can skip it
    again = MetricsLogger(LoggingConfig(backends=["jsonl"], **QUIET), tmp_path / "r")
    again.log({"train/loss": 0.5}, 2)
    again.close()
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == [0, 1, 2]


def test_names_and_values_are_checked(tmp_path):
    log = MetricsLogger(LoggingConfig(backends=["jsonl"], **QUIET), tmp_path / "r")
    with pytest.raises(ValueError, match="train/"):
        log.log({"loss": 1.0}, 0)
    with pytest.raises(TypeError, match="train/name"):
        log.log({"train/name": "abc"}, 0)
    log.close()


def test_samples_are_capped_per_call_in_total_and_in_length(tmp_path):
    cfg = LoggingConfig(backends=["jsonl"], samples_per_log=2, samples_max_rows=5, samples_max_chars=10, **QUIET)
    log = MetricsLogger(cfg, tmp_path / "r")
    for step in range(4):
        log.log_samples([{"text": "x" * 50, "messages": [{"role": "user", "content": "y" * 30}]}] * 3, step)
    log.close()
    rows = read_samples(tmp_path / "r")
    assert [r["step"] for r in rows] == [0, 0, 1, 1, 2]
    assert rows[0]["text"].startswith("x" * 10 + "…") and "40 more chars" in rows[0]["text"]
    assert rows[0]["messages"][0]["content"].startswith("y" * 10 + "…")


def test_logging_config_loads_from_overrides_and_names_bad_values():
    cfg = load_config(LoggingConfig, None, ["backends=[jsonl,wandb]", "wandb_mode=offline", "console_every=3"])
    assert (cfg.backends, cfg.wandb_mode, cfg.console_every) == (["jsonl", "wandb"], "offline", 3)
    with pytest.raises(ConfigError, match=r"backends\.1.*'tensorboard'"):
        load_config(LoggingConfig, None, ["backends=[jsonl,tensorbord]"])
    with pytest.raises(ConfigError, match="console_every"):
        load_config(LoggingConfig, None, ["console_every=0"])


def test_wandb_mode_auto_is_online_only_with_an_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"


# ------------------------------------------------------------------------------ failing backends


def _run_with(tmp_path, backends, steps=5, **cfg):
    """Log ``steps`` steps; returns (the RuntimeWarnings raised, the active backends at the end, the logger)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = MetricsLogger(LoggingConfig(backends=backends, **QUIET, **cfg), tmp_path / "r", "r", {"a": 1})
        for step in range(steps):
            log.log({"train/loss": float(step)}, step)
        log.log_samples([{"x": 1}], steps)
        active = log.active_backends
        log.close()
    assert [r["train/loss"] for r in read_metrics(tmp_path / "r")] == [float(s) for s in range(steps)]  # never lost
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)], active


def test_wandb_not_installed_warns_once_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    messages, active = _run_with(tmp_path, ["jsonl", "wandb"])
    assert len(messages) == 1 and "'wandb' failed to start" in messages[0] and "ModuleNotFoundError" in messages[0]
    assert active == ["jsonl"]


def _fake_wandb(init_error=None, log_error_at=None):
    calls = {"log": 0, "finished": []}

    class Run:
        id, url, dir = "fake", "", "/nonexistent/files"

        def log(self, data, step):
            calls["log"] += 1
            if log_error_at is not None and calls["log"] >= log_error_at:
                raise ConnectionError("wandb-core went away")

        def finish(self, exit_code=0):
            calls["finished"].append(exit_code)

    def init(**kw):
        if init_error:
            raise init_error
        return Run()

    module = types.ModuleType("wandb")
    module.Settings = lambda **kw: kw
    module.init = init
    module.Table = lambda **kw: kw
    return module, calls


def test_wandb_crashing_at_init_warns_once_and_the_run_goes_on(tmp_path, monkeypatch):
    module, _ = _fake_wandb(init_error=RuntimeError("init timed out"))
    monkeypatch.setitem(sys.modules, "wandb", module)
    messages, active = _run_with(tmp_path, ["jsonl", "tensorboard", "wandb"])
    assert len(messages) == 1 and "init timed out" in messages[0]
    assert active == ["jsonl", "tensorboard"]
    assert [v for _, v in read_tensorboard_scalars(tmp_path / "r")["train/loss"]] == [0, 1, 2, 3, 4]


def test_wandb_crashing_mid_run_warns_once_and_is_dropped(tmp_path, monkeypatch):
    module, calls = _fake_wandb(log_error_at=3)
    monkeypatch.setitem(sys.modules, "wandb", module)
    messages, active = _run_with(tmp_path, ["jsonl", "wandb"], steps=8)
    assert len(messages) == 1 and "'wandb' failed in log" in messages[0] and "went away" in messages[0]
    assert active == ["jsonl"]
    assert calls["log"] == 3 and calls["finished"] == [1]  # no more calls after the failure; the run is finished as failed


def test_unwritable_tensorboard_folder_warns_once_and_the_run_goes_on(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "tb").write_text("a file where the folder should be")
    messages, active = _run_with(tmp_path, ["jsonl", "tensorboard"], tensorboard_dir="tb")
    assert len(messages) == 1 and "'tensorboard' failed to start" in messages[0]
    assert active == ["jsonl"]


def test_tensorboard_failing_mid_run_warns_once_and_is_dropped(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def broken(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", broken)
    messages, active = _run_with(tmp_path, ["jsonl", "tensorboard"])
    assert len(messages) == 1 and "No space left" in messages[0]
    assert active == ["jsonl"]


def test_moe_load_metrics_gives_balance_per_layer_and_shares_for_small_layers():
    from hybrid_rl.metrics import moe_load_metrics

    got = moe_load_metrics({1: [2, 2, 4, 0], 5: [1] * 32})
    assert got["moe/load_max/layer1"] == 2.0 and got["moe/load_min/layer1"] == 0.0
    assert got["moe/dead_experts/layer1"] == 1.0
    assert [got[f"moe/expert_load/layer1/e{e}"] for e in range(4)] == [0.25, 0.25, 0.5, 0.0]
    assert got["moe/load_max/layer5"] == 1.0 and not any(k.startswith("moe/expert_load/layer5") for k in got)


def test_every_name_the_job_logs_is_documented(full_run):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "METRICS.md").read_text()
    documented = set(re.findall(r"`((?:train|rollout|eval|perf|moe)/[^`\s]+)`", doc))
    patterns = [re.compile(re.escape(n).replace("<env>", "[^/]+").replace("<i>", r"\d+").replace("<j>", r"\d+") + "$")
                for n in documented]
    _, logged, _ = full_run
    names = {k for row in logged for k in row if k != "step"}
    assert [n for n in sorted(names) if not any(p.match(n) for p in patterns)] == []


def test_a_stage_that_raises_marks_the_wandb_run_failed(tmp_path, monkeypatch):
    module, calls = _fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    with pytest.raises(KeyError):
        with MetricsLogger(LoggingConfig(backends=["jsonl", "wandb"], **QUIET), tmp_path / "r") as log:
            log.log({"train/loss": 1.0}, 0)
            raise KeyError("boom")
    assert calls["finished"] == [1]
    assert [r["train/loss"] for r in read_metrics(tmp_path / "r")] == [1.0]


def test_progress_bars_are_off_in_ci(monkeypatch):
    from hybrid_rl.log import progress

    monkeypatch.setenv("CI", "true")
    assert progress(range(3), total=3, desc="eval", unit="episode").disable


def test_a_resumed_run_goes_on_in_the_same_wandb_run_and_tensorboard_drops_the_replayed_steps(tmp_path, monkeypatch):
    """A run stopped after logging step 4, resumed from its step-2 checkpoint, logs steps 3-4 again: wandb went
    on in a second run (another id, holding only the later steps) and TensorBoard kept both copies of 3 and 4."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = LoggingConfig(backends=["jsonl", "tensorboard", "wandb"], report=False)
    first = MetricsLogger(cfg, tmp_path, "r")
    for step in (1, 2, 3, 4):
        first.log({"train/loss": float(step)}, step)
    first.close(failed=True)
    run_id = read_run_info(tmp_path)["wandb_id"]
    time.sleep(1.1)  # wandb names an offline folder by its start second and the id: a resume within it would share it
    again = MetricsLogger(cfg, tmp_path, "r", resume_step=2)
    again.log({"train/samples": 7.0}, 2)  # (SFT logs its data figures at the step it resumes from)
    for step in (3, 4, 5):
        again.log({"train/loss": 10.0 * step}, step)
    again.close()
    assert read_run_info(tmp_path)["wandb_id"] == run_id
    wb = read_wandb_offline_run(tmp_path)
    assert wb.run_id == run_id
    assert [(h["_step"], h["train/loss"]) for h in wb.history] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    assert [h.get("train/samples") for h in wb.history] == [None, 7.0, None, None, None]
    tb = read_tensorboard_scalars(tmp_path)
    assert tb["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)] and tb["train/samples"] == [(2, 7.0)]

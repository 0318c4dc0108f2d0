"""The `hybrid-rl` command line: help everywhere, and config errors before any work starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_rl.cli import COMMANDS, available_commands, main

REPO = Path(__file__).resolve().parents[2]
STAGES_WITH_CONFIG = ["sft", "rl", "pipeline"]


def test_every_planned_command_exists():
    missing = sorted(set(COMMANDS) - set(available_commands()))
    assert not missing, f"commands listed in hybrid_rl.cli.COMMANDS without a module: {missing}"


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in available_commands():
        assert name in out


def test_unknown_command_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["trian"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'trian'" in err and "sft" in err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_on_every_command(command, capsys):
    if command not in available_commands():
        pytest.fail(f"command {command} has no module yet")
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"hybrid-rl {command}" in capsys.readouterr().out


@pytest.mark.parametrize("command", STAGES_WITH_CONFIG)
@pytest.mark.parametrize(
    "override, expected",
    [
        ("nonexistent.key=3", ["'nonexistent.key'", "Did you mean"]),
        ("model.hiden_size=64", ["'model.hiden_size'", "model.hidden_size"]),
        ("model.hidden_size=abc", ["model.hidden_size", "'abc'", "expected int"]),
        ("run.log_level=verbose", ["run.log_level 'verbose'", "DEBUG, INFO, WARNING, ERROR"]),  # was a traceback
    ],
)
def test_stage_config_errors_fail_before_work(command, override, expected, capsys, tmp_path, monkeypatch):
    if command not in available_commands():
        pytest.fail(f"command {command} has no module yet")
    monkeypatch.chdir(tmp_path)  # any run directory would appear here: there must be none
    code = main([command, override, "run.output_dir=runs"])
    assert code != 0
    err = capsys.readouterr().err
    for piece in expected:
        assert piece in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", STAGES_WITH_CONFIG)
def test_print_config_shows_resolved_config(command, capsys):
    if command not in available_commands():
        pytest.fail(f"command {command} has no module yet")
    assert main([command, "--print-config", "model.hidden_size=96"]) == 0
    out = capsys.readouterr().out
    assert "hidden_size: 96" in out


@pytest.mark.parametrize("command, recipe, override, shown", [("rl", "rl_quick.yaml", "algo.credit=state", "credit: state"),
                                                               ("sft", "sft_quick.yaml", "train.lr=0.5", "lr: 0.5")])
def test_overrides_may_follow_an_option(command, recipe, override, shown, capsys):
    """`hybrid-rl rl cfg.yaml --print-config key=value`: the override after the option is one (argparse refused it
    as an unrecognized argument)."""
    from hybrid_rl.config import CONFIG_DIR

    assert main([command, str(CONFIG_DIR / recipe), "--print-config", override]) == 0
    assert shown in capsys.readouterr().out


def test_missing_config_file_names_the_path(capsys):
    code = main(["sft", "no/such/recipe.yaml"])
    assert code == 2
    assert "no/such/recipe.yaml" in capsys.readouterr().err


def test_console_script_end_to_end(tmp_path):
    """The installed `hybrid-rl` entry point, as a user runs it."""
    exe = Path(sys.executable).with_name("hybrid-rl")
    env = {**os.environ, "CI": "true"}
    proc = subprocess.run([str(exe), "sft", "model.hiden_size=64"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "model.hidden_size" in proc.stderr and "Traceback" not in proc.stderr

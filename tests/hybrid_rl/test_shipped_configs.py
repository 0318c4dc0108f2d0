"""Every config the package ships resolves with the command it is written for (`--print-config`), so a
renamed key or a bad value in configs/ fails here, not in a user's first run."""

from __future__ import annotations

import pytest

from hybrid_rl.cli import main
from hybrid_rl.config import CONFIG_DIR

COMMANDS = {"quickstart.yaml": "pipeline", "math_tool.yaml": "pipeline", "sft_quick.yaml": "sft",
            "rl_quick.yaml": "rl", "eval.yaml": "eval"}


def test_every_shipped_config_names_its_command():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_shipped_config_resolves(name, capsys):
    assert main([COMMANDS[name], str(CONFIG_DIR / name), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "run:" in printed and "name:" in printed

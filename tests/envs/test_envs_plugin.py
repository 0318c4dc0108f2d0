"""A package outside envs/, installed the way a user installs theirs, is discovered and plays.

The example package is copied to a temp dir (pip builds in the source tree), installed with
``pip install --no-deps --no-build-isolation --target``, and used from a fresh interpreter whose
PYTHONPATH includes the target: exactly what an installed plug-in looks like to ``from hybrid_rl import envs``.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hybrid-rl-example-env"

PLAY = """
from hybrid_rl import envs
env = envs.make("ReverseWord-v0")
obs, info = env.reset(seed=1)
word = obs.split()[-1]
print(env.step("???")[0])
obs, reward, terminated, truncated, info = env.step(word[::-1])
print(obs, reward, terminated, info["success"])
"""


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(EXAMPLE, tmp / "src")
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    return target


def _run(plugin_path, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_installed_plugin_appears_in_envs_list(plugin_path):
    result = _run(plugin_path, "-m", "hybrid_rl.cli", "envs", "list")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "ReverseWord-v0" in line)
    assert row.split()[:2] == ["hybrid_rl/ReverseWord-v0", "3"] and "backwards" in row


def test_installed_plugin_makes_and_plays_an_episode(plugin_path):
    result = _run(plugin_path, "-c", PLAY)
    assert result.returncode == 0, result.stderr
    invalid, final = result.stdout.strip().splitlines()
    assert invalid.startswith("Invalid:")
    assert final == "correct 0.95 True True"


def test_installed_plugin_passes_the_check(plugin_path):
    result = _run(plugin_path, "-m", "hybrid_rl.cli", "envs", "check", "ReverseWord-v0", "--episodes", "50")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hybrid_rl/ReverseWord-v0: PASS" in result.stdout


def test_without_the_plugin_the_env_is_unknown():
    result = subprocess.run([sys.executable, "-c", "from hybrid_rl import envs; envs.make('ReverseWord-v0')"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "ReverseWord" in result.stderr and "hybrid_rl/GuessNumber-v0" in result.stderr

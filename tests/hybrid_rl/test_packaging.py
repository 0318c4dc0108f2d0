"""One import namespace: the repository's folders install as hybrid_rl.* subpackages (pyproject.toml's
package-dir), so `pip install hybrid-rl` adds the single top-level name `hybrid_rl`, and the default
recipes (configs/ = hybrid_rl.configs) ship inside the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_folder_is_a_listed_subpackage_of_hybrid_rl():
    package_dir, packages = SETUPTOOLS["package-dir"], set(SETUPTOOLS["packages"])
    assert all(name == "hybrid_rl" or name.startswith("hybrid_rl.") for name in packages), packages
    # every Python package folder of the repository (tests/ and examples/ aside) is mapped into hybrid_rl
    repo_packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert repo_packages == set(package_dir.values()), (repo_packages, package_dir)
    # every folder with an __init__.py under a mapped folder is listed (setuptools does not find them itself)
    found = {name + "".join("." + part for part in init.parent.relative_to(ROOT / folder).parts)
             for name, folder in package_dir.items() for init in (ROOT / folder).rglob("__init__.py")}
    assert found == packages, (found ^ packages)


def test_the_default_configs_are_the_package_folder():
    import hybrid_rl.configs
    from hybrid_rl.config import CONFIG_DIR

    assert CONFIG_DIR == Path(hybrid_rl.configs.__file__).resolve().parent
    assert (CONFIG_DIR / "quickstart.yaml").is_file() and (CONFIG_DIR / "sft_quick.yaml").is_file()


def _top_level_names(dist_info: Path) -> set[str]:
    """The top-level names an installed distribution adds: top_level.txt if written, else RECORD's paths."""
    top_level = dist_info / "top_level.txt"
    if top_level.is_file():
        return set(top_level.read_text().split())
    names = {line.split(",")[0].split("/")[0] for line in (dist_info / "RECORD").read_text().splitlines() if line}
    return {n.removesuffix(".py") for n in names if not n.endswith(".dist-info") and n != ".."}


@pytest.mark.slow
def test_wheel_installs_only_hybrid_rl_and_runs_from_any_directory(tmp_path):
    # build from a copy holding what the wheel is built from: no stale build/ of the checkout can leak in
    src = tmp_path / "src"
    src.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy2(ROOT / name, src / name)
    for folder in SETUPTOOLS["package-dir"].values():
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
    wheels, target, empty = tmp_path / "wheels", tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("hybrid_rl-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        members = zf.namelist()
    assert {m.split("/")[0] for m in members if ".dist-info/" not in m} == {"hybrid_rl"}, sorted(members)[:20]
    for data in ["hybrid_rl/configs/quickstart.yaml", "hybrid_rl/model/fast/kernels/decode.c",
                 "hybrid_rl/model/fast/kernels/vec.h"]:
        assert data in members, data
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)

    (dist_info,) = target.glob("hybrid_rl-*.dist-info")
    assert _top_level_names(dist_info) == {"hybrid_rl"}
    assert {p.name for p in target.iterdir()} - {"bin"} == {"hybrid_rl", dist_info.name}

    # a fresh interpreter that sees the wheel and the dependencies, not the checkout: -S skips site (and so
    # any editable install's finder, a .pth file); the dependencies are this interpreter's import path
    # (site-packages and whatever its .pth files added), less the checkout's own folders (a venv inside the
    # checkout, as `make` creates it, is kept: its site-packages hold the dependencies)
    def from_checkout(p: str) -> bool:
        resolved = Path(p).resolve()
        return resolved.is_relative_to(ROOT) and "site-packages" not in resolved.parts

    deps = [p for p in sys.path if p and Path(p).is_dir() and not from_checkout(p)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *deps]), "CI": "true"}

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True, env=env, cwd=empty,
                              timeout=300)
        assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"
        return proc

    where = run("-c", "import hybrid_rl.model, hybrid_rl.envs, hybrid_rl.config as c; "
                      "print(hybrid_rl.model.__file__); print(hybrid_rl.envs.__file__); print(c.CONFIG_DIR)")
    for line in where.stdout.split():
        assert Path(line).is_relative_to(target / "hybrid_rl"), where.stdout
    for name in ["model", "envs", "rollout", "sft", "rl", "pipeline", "benchmarks"]:
        assert run("-c", f"import importlib.util; print(importlib.util.find_spec({name!r}))").stdout.strip() == "None"

    help_text = run("-m", "hybrid_rl.cli", "--help").stdout
    for command in ["pipeline", "sft", "rl", "eval", "envs", "convert", "bench", "report"]:
        assert f"  {command} " in help_text, help_text
    assert "hybrid_rl/GuessNumber-v0" in run("-m", "hybrid_rl.cli", "envs", "list").stdout
    config = run("-m", "hybrid_rl.cli", "pipeline", "--print-config").stdout
    assert "envs:" in config and "rl:" in config and "sft:" in config
    assert "lr:" in run("-m", "hybrid_rl.cli", "sft", "--print-config").stdout
    assert not list(empty.iterdir())  # nothing written to the working directory

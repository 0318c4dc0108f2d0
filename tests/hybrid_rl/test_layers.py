"""The import rules between the packages (docs/ARCHITECTURE.md), checked over every import statement,
also those inside functions: a layer imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["hybrid_rl", "model", "envs", "rollout", "sft", "rl", "pipeline", "benchmarks"]
# package -> packages it must never import, and why
FORBIDDEN = {
    "hybrid_rl": ({"model", "envs", "rollout", "sft", "rl", "pipeline", "benchmarks"}, "the foundation knows no stage "
                  "(the dispatcher names command modules as strings)"),
    "model": ({"envs", "rollout", "sft", "rl", "pipeline", "benchmarks"}, "the model knows no rollout, RL or envs"),
    "envs": ({"model", "rollout", "sft", "rl", "pipeline", "benchmarks"}, "envs never see tokens"),
    "rollout": ({"sft", "rl", "pipeline", "benchmarks"}, "rollout knows no loss"),
    "sft": ({"rl", "pipeline", "benchmarks"}, "SFT does not import RL"),
    "rl": ({"sft", "pipeline", "benchmarks"}, "RL does not import SFT; the pipeline chains them"),
    "pipeline": ({"benchmarks"}, "the application layer is not built on the benchmarks"),
}
STAGES = {"sft", "rl"}
STAGE_IMPORTERS = {"pipeline", "benchmarks"}  # the application layer and the benchmarks on top of it


def imports(pkg: str) -> list[tuple[str, str, int]]:
    """(imported top-level package, file, line) for every absolute import in ``pkg``."""
    out = []
    for path in sorted((ROOT / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            out += [(n.split(".")[0], str(path.relative_to(ROOT)), node.lineno) for n in names]
    return out


def test_every_package_imports_only_the_layers_below_it():
    broken = [f"{f}:{line} imports {top} ({FORBIDDEN[pkg][1]})"
              for pkg in FORBIDDEN for top, f, line in imports(pkg) if top in FORBIDDEN[pkg][0]]
    assert not broken, "\n".join(broken)


def test_only_the_application_layer_imports_the_stages():
    broken = [f"{f}:{line} imports the stage {top}" for pkg in PACKAGES if pkg not in STAGE_IMPORTERS
              for top, f, line in imports(pkg) if top in STAGES and top != pkg]
    assert not broken, "\n".join(broken)


def test_stage_commands_import_the_foundation_not_the_dispatcher():
    clis = [p for p in ROOT.glob("*/cli.py") if p.parent.name != "hybrid_rl"] + [ROOT / "pipeline" / "recipe.py"]
    assert len(clis) >= 5
    for path in clis:
        tree = ast.parse(path.read_text())
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "hybrid_rl.cli" not in modules, f"{path.relative_to(ROOT)} imports the dispatcher hybrid_rl.cli"


def test_the_rules_see_a_violation(tmp_path, monkeypatch):
    # the scanner itself: an import inside a function of a fake 'envs' is found
    fake = tmp_path / "envs"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from model import HybridLM\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert ("model", "envs/bad.py", 2) in imports("envs")

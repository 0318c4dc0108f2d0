"""The import rules between the packages (docs/ARCHITECTURE.md), checked over every import statement,
also those inside functions: a layer imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = ["model", "envs", "rollout", "sft", "rl", "pipeline", "benchmarks"]  # hybrid_rl.<name>, folder <name>/
# package -> its folder in the repository (pyproject.toml's package-dir); "hybrid_rl" is the foundation: every
# hybrid_rl.* module that is not in one of the subpackages
FOLDERS = {"hybrid_rl": "hybrid_rl", **{f"hybrid_rl.{name}": name for name in SUBPACKAGES}}
PACKAGES = list(FOLDERS)
MODEL, ENVS, ROLLOUT, SFT, RL, PIPELINE, BENCHMARKS = (f"hybrid_rl.{name}" for name in SUBPACKAGES)
# package -> packages it must never import, and why
FORBIDDEN = {
    "hybrid_rl": ({MODEL, ENVS, ROLLOUT, SFT, RL, PIPELINE, BENCHMARKS}, "the foundation knows no stage "
                  "(the dispatcher names command modules as strings)"),
    MODEL: ({ENVS, ROLLOUT, SFT, RL, PIPELINE, BENCHMARKS}, "the model knows no rollout, RL or envs"),
    ENVS: ({MODEL, ROLLOUT, SFT, RL, PIPELINE, BENCHMARKS}, "envs never see tokens"),
    ROLLOUT: ({SFT, RL, PIPELINE, BENCHMARKS}, "rollout knows no loss"),
    SFT: ({RL, PIPELINE, BENCHMARKS}, "SFT does not import RL"),
    RL: ({SFT, PIPELINE, BENCHMARKS}, "RL does not import SFT; the pipeline chains them"),
    PIPELINE: ({BENCHMARKS}, "the application layer is not built on the benchmarks"),
}
STAGES = {SFT, RL}
STAGE_IMPORTERS = {PIPELINE, BENCHMARKS}  # the application layer and the benchmarks on top of it


def package_of(module: str) -> str:
    """``hybrid_rl.model.hf`` -> ``hybrid_rl.model``; ``hybrid_rl.config`` -> ``hybrid_rl`` (the foundation);
    anything outside hybrid_rl -> its top-level name."""
    parts = module.split(".")
    if parts[0] != "hybrid_rl":
        return parts[0]
    return f"hybrid_rl.{parts[1]}" if len(parts) > 1 and parts[1] in SUBPACKAGES else "hybrid_rl"


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(module, line) for every absolute import in one file; ``from a import b`` gives ``a.b`` (b may be a module)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return out


def imports(pkg: str) -> list[tuple[str, str, int]]:
    """(imported package, file, line) for every absolute import in ``pkg`` (a key of FOLDERS)."""
    return [(package_of(module), str(path.relative_to(ROOT)), line)
            for path in sorted((ROOT / FOLDERS[pkg]).rglob("*.py")) for module, line in imported_modules(path)]


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
        modules = {m for m, _ in imported_modules(path)}
        assert not any(m == "hybrid_rl.cli" or m.startswith("hybrid_rl.cli.") for m in modules), \
            f"{path.relative_to(ROOT)} imports the dispatcher hybrid_rl.cli"


def test_ray_and_accelerate_stay_in_their_rooms():
    """Ray only in the rollout workers and pool (and the benchmarks that time them); accelerate only in the
    trainer core. Everything else reaches them through those modules."""
    allowed = {"ray": {"rollout/pool.py", "rollout/worker.py", "benchmarks/bench_rollout.py", "benchmarks/bench_sync.py"},
               "accelerate": {"hybrid_rl/distributed.py"}}
    seen = {name: set() for name in allowed}
    for pkg in PACKAGES:
        for path in sorted((ROOT / FOLDERS[pkg]).rglob("*.py")):
            for module, _ in imported_modules(path):
                if module.split(".")[0] in allowed:
                    seen[module.split(".")[0]].add(str(path.relative_to(ROOT)))
    for name, files in seen.items():
        assert files <= allowed[name], f"{name} imported outside its modules: {sorted(files - allowed[name])}"
        assert files, f"nothing imports {name}: the rule checks nothing"


def test_nothing_imports_the_old_top_level_names():
    """model, envs, ... are hybrid_rl.model, hybrid_rl.envs, ...: an install has no top-level ``model``."""
    files = [p for folder in [*FOLDERS.values(), "tests", "examples"] for p in sorted((ROOT / folder).rglob("*.py"))]
    broken = [f"{p.relative_to(ROOT)}:{line} imports {module}" for p in files for module, line in imported_modules(p)
              if module.split(".")[0] in SUBPACKAGES]
    assert not broken, "\n".join(broken)


def test_the_rules_see_a_violation(tmp_path, monkeypatch):
    # the scanner itself: imports inside a function of a fake envs/ are found, in every spelling
    fake = tmp_path / "envs"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from hybrid_rl.model import HybridLM\n    from hybrid_rl import rollout\n"
                                 "    import hybrid_rl.sft.data\n    from hybrid_rl import config\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert imports(ENVS) == [(MODEL, "envs/bad.py", 2), (ROLLOUT, "envs/bad.py", 3), (SFT, "envs/bad.py", 4),
                             ("hybrid_rl", "envs/bad.py", 5)]

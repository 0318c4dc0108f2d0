"""The one command line: ``hybrid-rl <command> [config.yaml] [key=value ...]``.

Each command lives in the package that owns it and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their command
runs, so ``hybrid-rl --help`` stays fast and a broken optional stage cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from hybrid_rl.checkpoint import CheckpointError
from hybrid_rl.config import ConfigError
from hybrid_rl.run import EnvsFailedError

# command -> (module, one-line help). Order is the order of the help text.
COMMANDS: dict[str, tuple[str, str]] = {
    "pipeline": ("hybrid_rl.pipeline.recipe", "SFT then GRPO then eval, end to end (the quickstart)"),
    "sft": ("hybrid_rl.sft.cli", "supervised fine-tuning on expert demonstrations or chat data"),
    "rl": ("hybrid_rl.rl.cli", "GRPO-style RL on the environment registry"),
    "eval": ("hybrid_rl.rollout.cli", "evaluate a checkpoint on environment seeds with the rollout workers"),
    "envs": ("hybrid_rl.envs.cli", "list and check the registered text environments"),
    "convert": ("hybrid_rl.model.cli", "convert checkpoints between HF NemotronH and hybrid-rl"),
    "bench": ("hybrid_rl.benchmarks.cli", "benchmarks against transformers / TRL (JSON output)"),
    "report": ("hybrid_rl.report", "build report.html for one run, or compare several"),
}


def available_commands() -> dict[str, tuple[str, str]]:
    """Commands whose module is present, found without importing anything (keeps --help fast)."""
    return {name: spec for name, spec in COMMANDS.items() if _module_exists(spec[0])}


def _module_exists(dotted: str) -> bool:
    package, _, module = dotted.rpartition(".")
    spec = importlib.util.find_spec(package)  # imports only the parents of `package` (here: hybrid_rl)
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(loc) / f"{module}.py").is_file() or (Path(loc) / module / "__init__.py").is_file()
               for loc in spec.submodule_search_locations)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = available_commands()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        top = argparse.ArgumentParser(
            prog="hybrid-rl",
            description="Agentic RL post-training of hybrid Mamba-2/attention/MoE models: SFT, then GRPO.",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="commands:\n" + "\n".join(f"  {n:<10} {h}" for n, (_, h) in commands.items())
            + "\n\nRun `hybrid-rl <command> --help` for a command's options.",
        )
        top.add_argument("command", choices=list(commands), help="the command to run")
        if not argv:
            top.print_help()
            return 2
        top.parse_args(argv[:1])  # prints help, or the unknown command with the valid choices, and exits
        return 2
    name = argv[0]
    module_name, help_text = commands[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"hybrid-rl {name}", description=help_text)
    module.add_arguments(parser)
    try:  # a stage's overrides may follow an option: `hybrid-rl rl cfg.yaml --print-config k=v`
        args = parser.parse_intermixed_args(argv[1:])
    except TypeError:  # (commands with sub-commands or a pass-through remainder: envs, bench)
        args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except ConfigError as err:
        print(f"hybrid-rl {name}: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, CheckpointError) as err:
        print(f"hybrid-rl {name}: error: {err}", file=sys.stderr)
        return 2
    except EnvsFailedError as err:  # a run whose environments failed every episode: stopped, its data kept
        print(f"hybrid-rl {name}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""``hybrid-rl bench NAME [options]``: run one benchmark; each prints a table and JSON.

A benchmark is a module with ``main(argv) -> int``, listed in ``BENCHMARKS``. Only those whose
module is present are offered, so a missing optional benchmark never breaks the others.
``hybrid-rl bench NAME --help`` shows a benchmark's own options.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

# name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "model": ("hybrid_rl.benchmarks.bench_model", "forward/decode speed and equivalence against transformers' NemotronH"),
    "memory": ("hybrid_rl.benchmarks.bench_memory", "decode-cache memory vs an all-attention twin; --train: per-device training memory and GPU counts"),
    "rollout": ("hybrid_rl.benchmarks.bench_rollout", "rollout throughput, cache extension vs re-prefill, 1 vs 2 Ray workers"),
    "grpo": ("hybrid_rl.benchmarks.bench_grpo", "one GRPO step of ours against TRL's GRPOTrainer on the same tiny model"),
    "sync": ("hybrid_rl.benchmarks.bench_sync", "weight push to a Ray worker: bucketed fp32 / bf16 vs one ray.put of the state dict"),
    "learning": ("hybrid_rl.benchmarks.bench_learning", "the pipeline recipe on several envs x seeds: random, teacher, SFT, RL, expert"),
}


def available() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in BENCHMARKS.items() if importlib.util.find_spec(spec[0]) is not None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = available()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "benchmarks:\n" + "\n".join(f"  {n:<10} {h}" for n, (_, h) in names.items())
    parser.add_argument("name", choices=list(names), help="the benchmark to run")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="options passed to the benchmark (see NAME --help)")


def run(args: argparse.Namespace) -> int:
    from hybrid_rl.run import torch_threads

    module = importlib.import_module(available()[args.name][0])
    with torch_threads(0):  # a benchmark that sets its own thread count gives the caller's back (tests run them in-process)
        return int(module.main(list(args.argv)) or 0)

#!/usr/bin/env bash
# GPU readiness on a CUDA machine, in under 8 minutes: the `gpu` tests (bf16 vs fp32, one SFT and one RL step,
# rollout-vs-trainer log-probs on CUDA), then training steps of tiny and small in fp32 / bf16 with and without
# activation checkpointing against the memory planner, inference forwards of nemotron3-nano at full size. Prints one JSON line (also benchmarks/results/gpu_check.json).
# Set up first with the CUDA torch build: `make TORCH=torch install`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
exec timeout 470 "$PY" -m hybrid_rl.benchmarks.gpu_check --json-out benchmarks/results/gpu_check.json "$@"

"""GPU readiness in one command (``scripts/gpu_check.sh``; under 8 minutes on one H100/H200): the ``gpu``
tests, then training steps of ``tiny`` and ``small`` on the GPU in fp32 and bf16, with and without
activation checkpointing: tokens/s and the peak of CUDA's allocator against the memory planner
(``model/memory.py``, ``path="torch"``: what a GPU runs). Prints one JSON line.

    python -m hybrid_rl.benchmarks.gpu_check [--json-out PATH] [--skip-tests]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from hybrid_rl.benchmarks.record import emit

CASES = [  # (preset, rows, tokens per row, micro-batches)
    ("tiny", 8, 1024, 2),
    ("small", 4, 1024, 2),
]


def run_gpu_tests(work: Path) -> dict:
    """pytest -m gpu tests/gpu: passed / failed / skipped and the figures the tests print (GPU_FIGURE lines)."""
    xml = work / "gpu-tests.xml"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "-s", "-p", "no:cacheprovider",
                           f"--junitxml={xml}"], capture_output=True, text=True, timeout=420)
    figures = {}
    for line in proc.stdout.splitlines():
        if line.startswith("GPU_FIGURE "):
            figures.update(json.loads(line[len("GPU_FIGURE "):]))
    out = {"returncode": proc.returncode, "seconds": round(time.time() - t0, 1), "figures": figures}
    if xml.exists():
        root = ET.parse(xml).getroot()
        suite = root.find("testsuite") if root.find("testsuite") is not None else root
        out.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    if proc.returncode:
        out["tail"] = (proc.stdout + proc.stderr)[-2000:]
    return out


def train_step_case(preset: str, rows: int, seq_len: int, micro_batches: int, dtype: str, checkpointing: bool) -> dict:
    """One AdamW step (``micro_batches`` accumulated forwards/backwards of a token-mean log-prob loss) on CUDA,
    after a warm-up step: seconds, tokens/s, CUDA allocator peak, and the planner's figure for it."""
    import torch

    from hybrid_rl.model import HybridConfig, HybridLM
    from hybrid_rl.model.memory import TrainSetup, train_memory

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    cfg = HybridConfig.from_preset(preset)
    model = HybridLM(cfg).cuda().train().set_activation_checkpointing(checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, cfg.vocab_size, (micro_batches, rows, seq_len + 1), device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step():
        for ids_bt in ids:
            with autocast:
                logits = model(ids_bt[:, :-1]).logits
            logp = torch.log_softmax(logits.float(), -1).gather(-1, ids_bt[:, 1:, None])[..., 0]
            del logits
            (-logp.mean() / micro_batches).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: kernels chosen, AdamW state made
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    measured = torch.cuda.max_memory_allocated()
    plan = train_memory(preset, TrainSetup(strategy="ddp", devices=1, dtype=dtype, batch=rows, seq_len=seq_len,
                                           checkpointing=checkpointing, path="torch"))
    del model, optimizer, ids
    return {"preset": preset, "dtype": dtype, "checkpointing": checkpointing, "tokens": rows * seq_len * micro_batches,
            "seconds": round(seconds, 4), "tokens_per_s": round(rows * seq_len * micro_batches / seconds, 1),
            "peak_bytes": int(measured), "planned_bytes": int(plan["total"]),
            "planned_over_measured": round(plan["total"] / measured, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybrid_rl.benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine (scripts/gpu_check.sh)", file=sys.stderr)
        return 2
    t0 = time.time()
    work = Path(args.json_out).parent if args.json_out else Path(".")
    result = {"benchmark": "gpu_check", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "tests": None if args.skip_tests else run_gpu_tests(work), "train_steps": []}
    for preset, rows, seq_len, micro in CASES:
        for dtype in ("fp32", "bf16"):
            for ckpt in (False, True):
                try:
                    result["train_steps"].append(train_step_case(preset, rows, seq_len, micro, dtype, ckpt))
                except Exception as err:  # one failing case must not hide the others' figures
                    result["train_steps"].append({"preset": preset, "dtype": dtype, "checkpointing": ckpt,
                                                  "error": f"{type(err).__name__}: {err}"[:500]})
    result["wall_s"] = round(time.time() - t0, 1)
    emit(result, args.json_out)
    failed = (result["tests"] or {}).get("returncode", 0) or any("error" in c for c in result["train_steps"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

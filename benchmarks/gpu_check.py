"""GPU readiness in one command (``scripts/gpu_check.sh``; under 8 minutes on one H100/H200): the ``gpu``
tests, then training steps of ``tiny`` and ``small`` on the GPU in fp32 and bf16, with and without
activation checkpointing: tokens/s and the peak of CUDA's allocator against the memory planner
(``model/memory.py``, ``path="torch"``: what a GPU runs); then inference forwards of ``nemotron3-nano`` at full size
(random init, bf16 weights). Prints one JSON line.

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

from hybrid_rl.benchmarks.record import emit, provenance

CASES = [  # (preset, rows, tokens per row, micro-batches)
    ("tiny", 8, 1024, 2),
    ("small", 4, 1024, 2),
]
FORWARD_CASES = [("nemotron3-nano", 1, 4096), ("nemotron3-nano", 4, 4096)]  # (preset, rows, tokens per row)


def figures_in(stdout: str) -> dict:
    """The figures the tests print (``GPU_FIGURE {json}``); pytest's progress dots can precede one on its line."""
    figures = {}
    for line in stdout.splitlines():
        at = line.find("GPU_FIGURE ")
        if at >= 0:
            figures.update(json.loads(line[at + len("GPU_FIGURE "):]))
    return figures


def run_gpu_tests(work: Path) -> dict:
    """pytest -m gpu tests/gpu: passed / failed / skipped and the figures the tests print (GPU_FIGURE lines)."""
    xml = work / "gpu-tests.xml"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "-s", "-p", "no:cacheprovider",
                           f"--junitxml={xml}"], capture_output=True, text=True, timeout=420)
    out = {"returncode": proc.returncode, "seconds": round(time.time() - t0, 1), "figures": figures_in(proc.stdout)}
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


def forward_case(preset: str, rows: int, seq_len: int, device: str = "cuda") -> dict:
    """Inference forwards of a full-size preset (random init, bf16 weights, made on the device): seconds, tokens/s
    and the allocator peak of the second of two forwards: ``nemotron3-nano`` (~32B parameters, 63 GB in bf16) served
    for inference on one GPU. (A rollout worker's model is fp32 today, twice that: see docs/BENCHMARKS.md.)"""
    import torch

    from hybrid_rl.model import HybridConfig, HybridLM

    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = HybridLM(HybridConfig.from_preset(preset)).eval()
    finally:
        torch.set_default_dtype(default)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (rows, seq_len), device=device)
    seconds = None
    with torch.no_grad():
        for _ in range(2):  # the first chooses kernels
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            logits = model(ids).logits
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            finite = bool(torch.isfinite(logits[:, -1].float()).all())
            del logits
    out = {"preset": preset, "params": params, "rows": rows, "seq_len": seq_len, "seconds": round(seconds, 4),
           "tokens_per_s": round(rows * seq_len / seconds, 1), "finite_logits": finite}
    if cuda:
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    del model
    return out


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
              **provenance(), "tests": None if args.skip_tests else run_gpu_tests(work), "train_steps": []}
    for preset, rows, seq_len, micro in CASES:
        for dtype in ("fp32", "bf16"):
            for ckpt in (False, True):
                try:
                    result["train_steps"].append(train_step_case(preset, rows, seq_len, micro, dtype, ckpt))
                except Exception as err:  # one failing case must not hide the others' figures
                    result["train_steps"].append({"preset": preset, "dtype": dtype, "checkpointing": ckpt,
                                                  "error": f"{type(err).__name__}: {err}"[:500]})
    result["forward"] = []
    for preset, rows, seq_len in FORWARD_CASES:
        try:
            result["forward"].append(forward_case(preset, rows, seq_len))
        except Exception as err:
            result["forward"].append({"preset": preset, "rows": rows, "seq_len": seq_len,
                                      "error": f"{type(err).__name__}: {err}"[:500]})
        finally:
            torch.cuda.empty_cache()
    result["wall_s"] = round(time.time() - t0, 1)
    emit(result, args.json_out)
    failed = (result["tests"] or {}).get("returncode", 0) or any("error" in c for c in result["train_steps"] + result["forward"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

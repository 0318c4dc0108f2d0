"""``hybrid-rl bench sync``: seconds and bytes of one weight push to a Ray rollout worker, three ways.

For each preset (``tiny`` and ``small`` by default), in the same run and the same local Ray, with one
rollout worker:

1. baseline: what ``RolloutPool.push_weights`` did before buckets: a CPU copy of the whole fp32 state
   dict, one ``ray.put``, the worker loads it (``RolloutWorker.set_weights``);
2. fp32 buckets: ``push_weights`` with ``pool.sync_dtype=fp32`` (buckets of ``pool.sync_bucket_mb``);
3. bf16 buckets: the same with ``pool.sync_dtype=bf16`` (half the bytes; the worker casts back to fp32).

Every push carries a new version, and the clock stops when a ping of the worker answers with that
version: the weights are applied. Rounds interleave the three modes, so load from other processes hits
them alike; each figure is the median of ``--repeats`` rounds after one warm-up round. The local Ray's
object store is sized for the baseline (twice the largest fp32 state dict), which needs the whole model
in the store at once.

Then, with ``--default-store-preset`` (``small``), Ray is started again with the default
``PoolConfig.object_store_mb`` and a bf16 bucketed push of that preset is tried: whether the buckets
fit where the whole state dict does not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from hybrid_rl.benchmarks.record import emit, provenance
from hybrid_rl.rollout.config import PoolConfig
from hybrid_rl.run import torch_threads

MiB = 1024 ** 2
MODES = ("baseline", "fp32_bucket", "bf16_bucket")


def build_state(preset: str) -> dict[str, torch.Tensor]:
    from hybrid_rl.model import HybridConfig, HybridLM

    torch.manual_seed(0)
    return HybridLM(HybridConfig.from_preset(preset)).float().state_dict()


def start_pool(preset: str, bucket_mb: float, sync_dtype: str = "fp32"):
    from hybrid_rl.rollout.pool import ConfigModel, RolloutPool

    cfg = PoolConfig(num_workers=1, num_cpus_per_worker=1, torch_threads=1, task_timeout_s=600,
                     sync_bucket_mb=bucket_mb, sync_dtype=sync_dtype)
    return RolloutPool(ConfigModel.preset(preset, seed=1), cfg)


def confirm(pool, version: int) -> None:
    """A round trip to the worker: it must hold ``version`` now."""
    held = pool._ray.get(pool._control(pool.workers[0], "ping"))["version"]
    if held != version:
        raise RuntimeError(f"the rollout worker holds weights version {held} after pushing version {version}")


def push_baseline(pool, state: dict[str, torch.Tensor], version: int) -> int:
    """The push before buckets: copy the whole fp32 state dict, one ray.put, the worker loads it."""
    cpu = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
    ref = pool._ray.put(cpu)
    pool._ray.get(pool._control(pool.workers[0], "set_weights", ref, version))
    return sum(v.numel() * v.element_size() for v in cpu.values())


def push_timed(pool, state: dict[str, torch.Tensor], mode: str, version: int) -> dict:
    t0 = time.perf_counter()
    if mode == "baseline":
        sent, buckets = push_baseline(pool, state, version), 1
    else:
        pool.cfg.sync_dtype = mode.split("_")[0]
        pool.push_weights(state, version)
        sent, buckets = pool.last_push["bytes"], pool.last_push["buckets"]
    confirm(pool, version)
    return {"seconds": time.perf_counter() - t0, "bytes": sent, "buckets": buckets}


def measure_preset(preset: str, args, versions) -> dict:
    state = build_state(preset)
    row: dict = {"preset": preset, "params": sum(v.numel() for v in state.values())}
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with start_pool(preset, args.bucket_mb) as pool:
        for round_ in range(args.repeats + 1):  # round 0 warms up (first allocations in the worker)
            for mode in MODES:
                result = push_timed(pool, state, mode, next(versions))
                if round_:
                    runs[mode].append(result)
    for mode in MODES:
        seconds = [r["seconds"] for r in runs[mode]]
        row[mode] = {"bytes": runs[mode][0]["bytes"], "buckets": runs[mode][0]["buckets"],
                     "seconds": statistics.median(seconds), "seconds_all": seconds}
    row["baseline_over_fp32_bucket"] = row["baseline"]["seconds"] / row["fp32_bucket"]["seconds"]
    row["baseline_over_bf16_bucket"] = row["baseline"]["seconds"] / row["bf16_bucket"]["seconds"]
    return row


def default_store_check(ray, preset: str, args) -> dict:
    """Ray again with the default object store; a bf16 bucketed push of ``preset``."""
    store_mb = PoolConfig().object_store_mb
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=store_mb * MiB)
    out = {"preset": preset, "object_store_mb": store_mb,
           "store_bytes": ray.cluster_resources().get("object_store_memory")}
    state = build_state(preset)
    out["fp32_state_bytes"] = sum(v.numel() * v.element_size() for v in state.values())
    try:
        with start_pool(preset, args.bucket_mb, "bf16") as pool:
            t0 = time.perf_counter()
            pool.push_weights(state, 1)
            confirm(pool, 1)
            out.update(bf16_bucket_ok=True, seconds=time.perf_counter() - t0, bytes=pool.last_push["bytes"],
                       buckets=pool.last_push["buckets"])
    except Exception as err:  # noqa: BLE001 - the answer is whether it works, and why not
        out.update(bf16_bucket_ok=False, error=f"{type(err).__name__}: {err}"[:500])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybrid-rl bench sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=3, help="median of N rounds (after one warm-up round)")
    parser.add_argument("--bucket-mb", type=float, default=PoolConfig().sync_bucket_mb, help="pool.sync_bucket_mb")
    parser.add_argument("--default-store-preset", default="small",
                        help="try a bf16 bucketed push of this preset with the default object store ('' = skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    parser.add_argument("--json-out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        return _run(args)


def _run(args) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from hybrid_rl.model import HybridConfig, HybridLM

    with torch.device("meta"):  # sizes only, nothing allocated
        largest = max(sum(v.numel() for v in HybridLM(HybridConfig.from_preset(p)).state_dict().values())
                      for p in args.presets) * 4
    store = max(PoolConfig().object_store_mb * MiB, 2 * largest + 256 * MiB)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=store)
    result = {"benchmark": "sync", "bucket_mb": args.bucket_mb, "repeats": args.repeats, "workers": 1,
              "object_store_mb": ray.cluster_resources().get("object_store_memory", 0) / MiB,
              "torch_threads": args.threads, **provenance(), "cpu_count": os.cpu_count(),
              "load_avg_1m_start": os.getloadavg()[0]}
    versions = iter(range(1, 1 << 30))
    try:
        result["presets"] = [measure_preset(preset, args, versions) for preset in args.presets]
        if args.default_store_preset and started:
            result["default_store"] = default_store_check(ray, args.default_store_preset, args)
    finally:
        if started:
            ray.shutdown()
    result["load_avg_1m_end"] = os.getloadavg()[0]  # other processes on the machine skew every figure
    print(table(result), file=sys.stderr)
    emit(result, args.json_out)  # one JSON line: what benchmarks.record reads
    return 0


def table(result: dict) -> str:
    lines = ["preset  params       " + "  ".join(f"{m + ' MiB / s':>24}" for m in MODES) + "  baseline/bf16"]
    for row in result["presets"]:
        cells = "  ".join(f"{row[m]['bytes'] / MiB:>14.1f} / {row[m]['seconds']:7.3f}" for m in MODES)
        lines.append(f"{row['preset']:<7} {row['params']:>11,}  {cells}  {row['baseline_over_bf16_bucket']:>12.2f}x")
    d = result.get("default_store")
    if d:
        lines.append(f"bf16 buckets of {d['preset']} with the default {d['object_store_mb']} MiB object store: "
                     + (f"works ({d['seconds']:.2f} s)" if d["bf16_bucket_ok"] else f"fails: {d['error']}"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Rollout benchmark: throughput of the engine, cache extension against re-prefilling, 1 vs 2 Ray workers.

    hybrid-rl bench rollout [--preset tiny] [--groups 8] [--group-size 4] [--turns 4 8 16] [--no-ray]

Three measurements, each a comparison made in the same run (absolute numbers drift between machines):

1. throughput: ``groups x group_size`` episodes of a multi-turn environment (FixedTurns, 4 turns) with
   the model in one process: episodes/s, generated tokens/s, all tokens/s.
2. extension vs re-prefill: one episode of 4, 8 and 16 turns (observations of 24 and of 256 characters)
   played twice with greedy decoding (the same tokens): once extending the cache with only the new tokens each turn (what the engine does),
   once rebuilding the cache from the whole history at every turn (what a generate()-per-turn loop,
   e.g. TRL's, does). Extension grows linearly in the turns, re-prefilling quadratically; both the
   seconds and the tokens pushed through the model are reported.
3. Ray: the same groups on a pool of 1 and of 2 workers (1 CPU and 1 torch thread each).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from hybrid_rl.benchmarks.record import emit
from hybrid_rl.model.tokenizer import ByteTokenizer
from hybrid_rl.rollout.config import EpisodeConfig, PoolConfig, SamplingConfig
from hybrid_rl.rollout.engine import Engine, GroupRequest
from hybrid_rl.benchmarks.fixed_turns import FIXED_TURNS_ID


def build_model(preset: str, seed: int = 0):
    from hybrid_rl.model import HybridConfig, HybridLM

    torch.manual_seed(seed)
    return HybridLM(HybridConfig.from_preset(preset)).float().eval()


def requests(groups: int, group_size: int, turns: int, obs_len: int = 24) -> list[GroupRequest]:
    """FixedTurns groups; ``obs_len`` characters per observation (long ones stand for tool output)."""
    return [GroupRequest(FIXED_TURNS_ID, seed=g, group_id=g, num_samples=group_size,
                         env_kwargs={"obs_len": obs_len, "turns": turns}) for g in range(groups)]


def measure_throughput(model, tok, args) -> dict:
    episode = EpisodeConfig(max_turn_tokens=args.max_turn_tokens, max_batch_episodes=args.batch, env_timeout_s=0)
    engine = Engine(model, tok, SamplingConfig(seed=0, ascii_only=True), episode)
    engine.play(requests(1, 2, 2))  # warm-up
    t0 = time.perf_counter()
    trajs = engine.play(requests(args.groups, args.group_size, 4))
    elapsed = time.perf_counter() - t0
    generated = sum(t.num_action_tokens for t in trajs)
    total = sum(t.num_tokens for t in trajs)
    return {"env": FIXED_TURNS_ID, "turns": 4, "episodes": len(trajs), "seconds": elapsed,
            "episodes_per_s": len(trajs) / elapsed, "generated_tokens_per_s": generated / elapsed,
            "tokens_per_s": total / elapsed, "mean_tokens_per_episode": total / len(trajs),
            "batch_rows": args.batch}


def measure_extension(model, tok, args, obs_len: int) -> tuple[list[dict], dict]:
    rows = []
    greedy = SamplingConfig(temperature=0.0, ascii_only=True)
    episode = EpisodeConfig(max_turn_tokens=args.max_turn_tokens, max_batch_episodes=1, env_timeout_s=0,
                            max_episode_tokens=1 << 20)
    for turns in args.turns:
        result = {"turns": turns, "obs_len": obs_len}
        ids = {}
        for mode, reprefill in (("extend", False), ("reprefill", True)):
            best = float("inf")
            for _ in range(args.repeats):
                engine = Engine(model, tok, greedy, episode, reprefill=reprefill)
                t0 = time.perf_counter()
                (traj,) = engine.play(requests(1, 1, turns, obs_len))
                best = min(best, time.perf_counter() - t0)
            ids[mode] = traj.token_ids
            result[f"{mode}_s"] = best
            result[f"{mode}_model_tokens"] = engine.stats["fed_tokens"] + engine.stats["prefill_tokens"]
        result["episode_tokens"] = len(ids["extend"])
        result["same_tokens"] = ids["extend"] == ids["reprefill"]
        result["speedup"] = result["reprefill_s"] / result["extend_s"]
        rows.append(result)
    first, last = rows[0], rows[-1]
    return rows, {"obs_len": obs_len, "turns_ratio": last["turns"] / first["turns"],
                  "extend_time_ratio": last["extend_s"] / first["extend_s"],
                  "reprefill_time_ratio": last["reprefill_s"] / first["reprefill_s"],
                  "extend_tokens_ratio": last["extend_model_tokens"] / first["extend_model_tokens"],
                  "reprefill_tokens_ratio": last["reprefill_model_tokens"] / first["reprefill_model_tokens"]}


def measure_ray(model, args) -> dict:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from hybrid_rl.rollout.pool import ConfigModel, RolloutPool

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024 ** 2)
    out = {}
    episode = EpisodeConfig(max_turn_tokens=args.max_turn_tokens, max_batch_episodes=args.batch, env_timeout_s=0)
    for workers in (1, 2):
        cfg = PoolConfig(num_workers=workers, num_cpus_per_worker=1, torch_threads=1, task_timeout_s=600)
        with RolloutPool(ConfigModel.preset(args.preset), cfg, SamplingConfig(seed=0, ascii_only=True), episode) as pool:
            pool.push_weights(model.state_dict(), 1)
            pool.run_groups(requests(workers, 1, 2))  # warm-up on every worker
            t0 = time.perf_counter()
            trajs = pool.run_groups(requests(args.groups, args.group_size, 4))
            elapsed = time.perf_counter() - t0
        out[f"workers_{workers}"] = {"episodes": len(trajs), "seconds": elapsed, "episodes_per_s": len(trajs) / elapsed,
                                     "generated_tokens_per_s": sum(t.num_action_tokens for t in trajs) / elapsed}
    out["speedup_2_vs_1"] = out["workers_2"]["episodes_per_s"] / out["workers_1"]["episodes_per_s"]
    ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybrid-rl bench rollout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--groups", type=int, default=8, help="GRPO groups in the throughput and Ray runs")
    parser.add_argument("--group-size", type=int, default=4, help="samples per group (forked from one prefill)")
    parser.add_argument("--batch", type=int, default=32, help="rows decoded together (max_batch_episodes)")
    parser.add_argument("--max-turn-tokens", type=int, default=16)
    parser.add_argument("--turns", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--obs-lens", type=int, nargs="+", default=[24, 256],
                        help="characters per observation in the extension comparison (256 ~ a short tool output)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N for the extension comparison (a shared machine is noisy)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    parser.add_argument("--no-ray", action="store_true", help="skip the 1 vs 2 worker comparison")
    parser.add_argument("--json-out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args) -> int:
    tok = ByteTokenizer()
    model = build_model(args.preset)
    result = {"benchmark": "rollout", "preset": args.preset, "torch_threads": args.threads,
              "group_size": args.group_size, "max_turn_tokens": args.max_turn_tokens,
              "cpu_count": os.cpu_count(), "load_avg_1m_start": os.getloadavg()[0]}
    result["throughput"] = measure_throughput(model, tok, args)
    result["extension_vs_reprefill"], result["growth_first_to_last"] = [], []
    for obs_len in args.obs_lens:
        rows, growth = measure_extension(model, tok, args, obs_len)
        result["extension_vs_reprefill"] += rows
        result["growth_first_to_last"].append(growth)
    if not args.no_ray:
        result["ray"] = measure_ray(model, args)
    result["load_avg_1m_end"] = os.getloadavg()[0]  # other processes on the machine skew every figure
    print(table(result), file=sys.stderr)
    emit(result, args.json_out)  # one JSON line: what benchmarks.record reads
    return 0


def table(result: dict) -> str:
    tp = result["throughput"]
    lines = [f"throughput ({result['preset']}, {tp['episodes']} episodes of {tp['turns']} turns): "
             f"{tp['episodes_per_s']:.2f} episodes/s, {tp['generated_tokens_per_s']:.0f} generated tok/s, "
             f"{tp['tokens_per_s']:.0f} tok/s",
             "obs_len  turns  extend_s  reprefill_s  speedup  model tokens (extend / reprefill)"]
    for r in result["extension_vs_reprefill"]:
        lines.append(f"{r['obs_len']:>7}  {r['turns']:>5}  {r['extend_s']:8.3f}  {r['reprefill_s']:11.3f}  {r['speedup']:7.2f}  "
                     f"{r['extend_model_tokens']} / {r['reprefill_model_tokens']}")
    if "ray" in result:
        ray_r = result["ray"]
        lines.append(f"ray: 1 worker {ray_r['workers_1']['episodes_per_s']:.2f} ep/s, 2 workers "
                     f"{ray_r['workers_2']['episodes_per_s']:.2f} ep/s (x{ray_r['speedup_2_vs_1']:.2f})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Rollout benchmark: throughput of the engine against the model's raw decode, a slow environment against an
instant one, cache extension against re-prefilling, 1 vs 2 Ray workers.

    hybrid-rl bench rollout [--preset tiny] [--groups 8] [--group-size 4] [--turns 4 8 16] [--no-ray]

Four measurements, each a comparison made in the same run (absolute numbers drift between machines):

1. throughput: ``groups x group_size`` episodes of a multi-turn environment (FixedTurns, 4 turns) with
   the model in one process: episodes/s, generated tokens/s, all tokens/s; and, interleaved with it, the
   same model's raw ``decode_step`` loop (greedy, nothing else) at the same batch size. Their ratio is the
   share of the model's decode speed the engine keeps while it samples, ends turns, steps environments
   and prefills observations. Medians of ``--repeats`` rounds; the ratio is the median of the rounds' ratios
   (each round's engine run over the raw loop timed right after it), after ``--warmup-rounds`` untimed ones.
2. slow environment: the same episodes with an environment that sleeps ``--env-delay`` seconds (50 ms)
   in every step, against the instant one; the ratio of wall times says how much of the environments'
   latency the engine hides behind decoding.
3. extension vs re-prefill: one episode of 4, 8 and 16 turns (observations of 24 and of 256 characters)
   played twice with greedy decoding (the same tokens): once extending the cache with only the new tokens each turn (what the engine does),
   once rebuilding the cache from the whole history at every turn (what a generate()-per-turn loop,
   e.g. TRL's, does). Extension grows linearly in the turns, re-prefilling quadratically; both the
   seconds and the tokens pushed through the model are reported.
4. Ray: the same groups on a pool of 1 and of 2 workers (1 CPU and 1 torch thread each).
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
from hybrid_rl.model.tokenizer import ByteTokenizer
from hybrid_rl.rollout.config import EpisodeConfig, PoolConfig, SamplingConfig
from hybrid_rl.rollout.engine import Engine, GroupRequest
from hybrid_rl.run import torch_threads
from hybrid_rl.benchmarks.fixed_turns import FIXED_TURNS_ID


def build_model(preset: str, seed: int = 0):
    from hybrid_rl.model import HybridConfig, HybridLM

    torch.manual_seed(seed)
    return HybridLM(HybridConfig.from_preset(preset)).float().eval()


def requests(groups: int, group_size: int, turns: int, obs_len: int = 24, step_delay_s: float = 0.0) -> list[GroupRequest]:
    """FixedTurns groups; ``obs_len`` characters per observation (long ones stand for tool output)."""
    kwargs = {"obs_len": obs_len, "turns": turns, "step_delay_s": step_delay_s}
    return [GroupRequest(FIXED_TURNS_ID, seed=g, group_id=g, num_samples=group_size, env_kwargs=kwargs)
            for g in range(groups)]


def play_timed(model, tok, args, reqs: list[GroupRequest]) -> dict:
    """A new engine (sampling seed 0) plays ``reqs``: seconds, trajectories, the forwards it made."""
    episode = EpisodeConfig(max_turn_tokens=args.max_turn_tokens, max_batch_episodes=args.batch, env_timeout_s=0)
    engine = Engine(model, tok, SamplingConfig(seed=0, ascii_only=True), episode)
    engine.batch_trace = []
    t0 = time.perf_counter()
    trajs = engine.play(reqs)
    elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "trajs": sorted(trajs, key=lambda t: (t.group_id, t.sample_index)),
            "stats": dict(engine.stats, mean_batch_rows=statistics.fmean(engine.batch_trace))}


def raw_decode_tokens_per_s(model, batch: int, prompt_tokens: int, new_tokens: int) -> float:
    """The model's own decode loop at ``batch`` rows: ``decode_step`` then argmax, nothing else (after a prefill)."""
    cache = model.new_cache(batch)
    prompt = torch.randint(10, 100, (batch, prompt_tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tokens_b = model.extend(cache, prompt).argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            tokens_b = model.decode_step(cache, tokens_b).argmax(-1)
        return batch * new_tokens / (time.perf_counter() - t0)


def measure_throughput(model, tok, args) -> tuple[dict, dict]:
    """The engine on the instant env, the raw decode loop at the same batch, and the engine on the slow env,
    interleaved round by round (load from other processes hits all three alike); medians of ``repeats``."""
    # warm-up: untimed rounds of each side at full size (``--warmup-rounds``, 2). A process's first full-size
    # plays grow the allocator's heap, the workspaces and the page tables: measured on a 2-core machine, the
    # first timed round's ratio was 0.34-0.39 after no or one such round and 0.45 after two, where the rounds
    # after them gave 0.47-0.52. A rollout worker plays batch after batch in one process; the rounds measure that.
    for _ in range(args.warmup_rounds):
        play_timed(model, tok, args, requests(args.groups, args.group_size, 4))
        raw_decode_tokens_per_s(model, args.batch, args.raw_prompt_tokens, args.raw_new_tokens)
        play_timed(model, tok, args, requests(args.groups, args.group_size, 4, step_delay_s=args.env_delay))
    fast, raw, slow = [], [], []
    for _ in range(args.repeats):
        fast.append(play_timed(model, tok, args, requests(args.groups, args.group_size, 4)))
        raw.append(raw_decode_tokens_per_s(model, args.batch, args.raw_prompt_tokens, args.raw_new_tokens))
        slow.append(play_timed(model, tok, args, requests(args.groups, args.group_size, 4, step_delay_s=args.env_delay)))
    run = sorted(fast, key=lambda r: r["seconds"])[len(fast) // 2]
    trajs, elapsed = run["trajs"], run["seconds"]
    generated = sum(t.num_action_tokens for t in trajs)
    total = sum(t.num_tokens for t in trajs)
    raw_tps = statistics.median(raw)
    # each round's engine run against the raw loop timed right after it: a drift of the machine's speed over
    # the minutes of the benchmark hits both sides of a round alike (as in bench_grpo's rounds)
    round_ratios = [sum(t.num_action_tokens for t in f["trajs"]) / f["seconds"] / r for f, r in zip(fast, raw)]
    throughput = {"env": FIXED_TURNS_ID, "turns": 4, "episodes": len(trajs), "seconds": elapsed,
                  "episodes_per_s": len(trajs) / elapsed, "generated_tokens_per_s": generated / elapsed,
                  "tokens_per_s": total / elapsed, "mean_tokens_per_episode": total / len(trajs),
                  "batch_rows": args.batch, "engine_stats": run["stats"], "repeats": args.repeats,
                  "warmup_rounds": args.warmup_rounds,
                  "raw_decode": {"batch": args.batch, "prompt_tokens": args.raw_prompt_tokens,
                                 "new_tokens": args.raw_new_tokens, "tokens_per_s": raw_tps},
                  "engine_vs_raw_decode": statistics.median(round_ratios),
                  "engine_vs_raw_decode_rounds": [round(x, 3) for x in round_ratios],
                  "engine_vs_median_raw_decode": generated / elapsed / raw_tps, "time_split": time_split(run, raw_tps)}
    slow_s = statistics.median(r["seconds"] for r in slow)
    same = all([t.token_ids for t in r["trajs"]] == [t.token_ids for t in trajs] for r in slow)
    slow_env = {"episodes": len(trajs), "step_delay_s": args.env_delay, "instant_s": elapsed, "slow_s": slow_s,
                "slow_vs_instant": slow_s / elapsed, "same_tokens": same}
    return throughput, slow_env


def time_split(run: dict, raw_tps: float) -> dict:
    """Where one engine run's seconds went: the model's decode steps, its cache extensions (the prompts'
    prefill and the observations), and the engine's own work (sampling, bookkeeping, env calls, row copies).
    ``engine_vs_raw_if_no_own_work``: the ratio to the raw loop if the engine's own work took no time; the
    extensions stay, since the raw loop feeds no observations."""
    stats, seconds = run["stats"], run["seconds"]
    model_s = stats["decode_s"] + stats["extend_s"]
    extend_tokens = stats["fed_tokens"] + stats["prefill_tokens"] - stats["decode_tokens"]
    return {"decode_s": stats["decode_s"], "extend_s": stats["extend_s"], "engine_own_s": seconds - model_s,
            "decode_share": stats["decode_s"] / seconds, "extend_share": stats["extend_s"] / seconds,
            "engine_own_share": (seconds - model_s) / seconds,
            "extend_tokens": extend_tokens, "extend_tokens_per_s": extend_tokens / stats["extend_s"],
            "decode_tokens_per_s": stats["decode_tokens"] / stats["decode_s"],
            "engine_vs_raw_if_no_own_work": stats["generated_tokens"] / model_s / raw_tps}


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
    parser.add_argument("--repeats", type=int, default=5,
                        help="best of N for the extension comparison, median of N for throughput (a shared machine is noisy)")
    parser.add_argument("--warmup-rounds", type=int, default=2,
                        help="untimed full-size rounds of the throughput comparison before the timed ones")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    parser.add_argument("--env-delay", type=float, default=0.05, help="seconds per step of the slow environment")
    parser.add_argument("--raw-prompt-tokens", type=int, default=32, help="prompt before the raw decode loop")
    parser.add_argument("--raw-new-tokens", type=int, default=64, help="decode steps of the raw decode loop")
    parser.add_argument("--no-ray", action="store_true", help="skip the 1 vs 2 worker comparison")
    parser.add_argument("--json-out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        return _run(args)


def _run(args) -> int:
    tok = ByteTokenizer()
    model = build_model(args.preset)
    result = {"benchmark": "rollout", "preset": args.preset, "torch_threads": args.threads,
              "group_size": args.group_size, "max_turn_tokens": args.max_turn_tokens,
              **provenance(), "cpu_count": os.cpu_count(), "load_avg_1m_start": os.getloadavg()[0]}
    result["throughput"], result["slow_env"] = measure_throughput(model, tok, args)
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
             f"{tp['tokens_per_s']:.0f} tok/s; raw decode_step at batch {tp['batch_rows']}: "
             f"{tp['raw_decode']['tokens_per_s']:.0f} tok/s (engine {100 * tp['engine_vs_raw_decode']:.1f}% of it)",
             f"slow env ({1000 * result['slow_env']['step_delay_s']:g} ms/step): {result['slow_env']['slow_s']:.2f} s "
             f"vs instant {result['slow_env']['instant_s']:.2f} s (x{result['slow_env']['slow_vs_instant']:.2f})",
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

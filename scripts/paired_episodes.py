"""RL against SFT and against the teacher, seed by seed: each learning-bench run's SFT and RL checkpoints play
the same held-out seeds again (``hybrid-rl eval``, greedy, the pipeline's turn limits), the teacher too, and
RL's outcome on each seed is paired with the other policy's. The bench's standard error is over its 3 run seeds (training noise);
this one is over the held-out seeds (which maps, numbers or boards were drawn): each seed's difference is
averaged over the runs, which all play the same seeds, and a sign test counts the seeds where RL is ahead
against those where the other policy is. Used for docs/RESULTS.md ("Is each difference real?").

    .venv/bin/python scripts/paired_episodes.py runs/learning/FrozenLake-v1-s0 runs/learning/FrozenLake-v1-s1 ...

Prints one JSON line per env (every run dir given for it pooled) and checks that each replayed success rate
(the teacher's included) is the one the run's results.json recorded.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def play(checkpoint: Path, env_id: str, episodes: int, cfg: dict, out: Path) -> dict[int, bool]:
    """seed -> success of ``checkpoint`` greedy on the first ``episodes`` eval seeds of ``env_id``."""
    rollout = cfg["rl"]["rollout"]
    cmd = [sys.executable, "-m", "hybrid_rl.cli", "eval", "--checkpoint", str(checkpoint), "--env", env_id,
           "--episodes", str(episodes), "--workers", "0", "--name", out.name, f"run.output_dir={out.parent}",
           f"episode.max_turn_tokens={cfg['eval']['max_turn_tokens']}",
           f"episode.max_episode_tokens={rollout['max_episode_tokens']}", "run.quiet=true"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines() if line.strip()]
    return {int(r["seed"]): bool(r["success"]) for r in rows}


def teacher(env_id: str, episodes: int, cfg: dict) -> dict[int, bool]:
    """seed -> success of the run's teacher, played as the pipeline's baseline plays it (envs.expert_stats: one env,
    the seeds in order)."""
    from hybrid_rl import envs

    env = envs.make(env_id)
    try:
        act = envs.expert_policy(env, cfg["demos"]["noise"], policy=cfg["demos"]["teacher"])
        return {s: envs.run_episode(env, act, seed=s).success for s in envs.seeds(env_id, "eval", episodes)}
    finally:
        env.close()


def paired(by_seed: dict[int, list[tuple[bool, bool]]]) -> dict:
    """Per held-out seed, the (other, rl) outcomes of every run that played it -> RL - other.

    The runs play the same seeds, so the unit of the seed noise is the seed, not the (run, seed) episode: each
    seed's difference is averaged over the runs first, the standard error is over the seeds, and the two-sided
    exact sign test counts the seeds where RL is ahead against those where the other policy is. The episode
    counts (run x seed) where exactly one of the two wins are given beside them."""
    diffs = [sum(int(rl) - int(other) for other, rl in runs) / len(runs) for runs in by_seed.values()]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else 0.0
    ahead, behind = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    k, m = min(ahead, behind), ahead + behind
    p = min(1.0, 2 * sum(math.comb(m, j) for j in range(k + 1)) / 2 ** m) if m else 1.0
    episodes = [(other, rl) for runs in by_seed.values() for other, rl in runs]
    return {"diff": round(mean, 4), "se_over_seeds": round(se, 4), "seeds": n, "seeds_rl_ahead": ahead,
            "seeds_other_ahead": behind, "sign_test_p": float(f"{p:.3g}"),
            "episodes_only_rl_wins": sum(rl and not other for other, rl in episodes),
            "episodes_only_other_wins": sum(other and not rl for other, rl in episodes)}


def main(run_dirs: list[str]) -> int:
    pooled: dict[str, dict[str, dict[int, list[tuple[bool, bool]]]]] = {}  # env -> other -> seed -> per run
    with tempfile.TemporaryDirectory() as tmp:
        for i, run in enumerate(map(Path, run_dirs)):
            res = json.loads((run / "results.json").read_text())
            cfg = yaml.safe_load((run / "eval" / "config.yaml").read_text())
            (env_id,) = res["envs"]
            key = env_id.replace("hybrid_rl/", "")
            episodes = cfg["eval"]["episodes_per_env"]
            root = run.resolve().parents[2]  # the checkpoints' paths are relative to where runs/learning/<run> was made
            outcome = {}
            for stage in ("sft", "rl"):
                outcome[stage] = play(root / res["checkpoints"][stage], env_id, episodes, cfg, Path(tmp) / f"{stage}{i}")
                recorded = res["results"][stage]["T=0"][f"eval/success/{key}"]
                replayed = sum(outcome[stage].values()) / len(outcome[stage])
                if abs(replayed - recorded) > 1e-9:
                    print(f"{run}: {stage} replays to {replayed:.3f}, results.json says {recorded:.3f}", file=sys.stderr)
                    return 1
            outcome["teacher"] = teacher(env_id, episodes, cfg)
            recorded = res["baselines"]["teacher"][key]["success"]
            if abs(sum(outcome["teacher"].values()) / episodes - recorded) > 1e-9:
                print(f"{run}: the teacher replays otherwise than results.json's {recorded:.3f}", file=sys.stderr)
                return 1
            for other in ("sft", "teacher"):
                by_seed = pooled.setdefault(env_id, {}).setdefault(other, {})
                for seed in sorted(outcome["sft"]):
                    by_seed.setdefault(seed, []).append((outcome[other][seed], outcome["rl"][seed]))
    for env_id, by_other in pooled.items():
        runs = len(next(iter(by_other["sft"].values())))
        print(json.dumps({"env": env_id, "runs": runs, **{f"rl_minus_{other}": paired(by_seed) for other, by_seed in by_other.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""One GRPO step, our loop vs TRL's ``GRPOTrainer``, on the same ``tiny`` model in the same run.

The step (the project brief's peer figures): 8 prompts x 8 samples of ``hybrid_rl/Arithmetic-v0`` ("a+b=", reward 1 for the
right sum), at most 32 new tokens, one optimizer update (AdamW). Both sides start from the same weights,
see the same chat-rendered prompt ids and the same reward function; each runs ``--steps`` steps and the
median of the steps after the first (warm-up) is reported.

    ours  rl.train: push weights to the in-process engine -> play the groups (cached, continuous batching)
          -> group advantages -> one update in micro-batches
    TRL   GRPOTrainer on transformers' NemotronHForCausalLM (model.generate, then its loss), without gradient
          checkpointing (TRL's default turns it on, which recomputes the forward in the backward; our update
          keeps its activations, so the two sides do the same arithmetic)

``--rounds R`` repeats the pair R times, alternating the sides (ours, TRL, ours, TRL, ...), each round from the
same initial weights with its own warm-up step: the speed of a shared machine drifts over minutes, and a
side timed only in a slow stretch would take the drift into the ratio. The reported ratio is then the median of
the rounds' ratios (each from steps timed minutes apart at most); the seconds per step are the medians over
all rounds' steps after their warm-ups.

``--dtypes fp32 bf16`` times both sides at each training precision (ours: ``train.dtype``, autocast of the
forwards, fp32 master weights, the rollout engine in fp32; TRL: ``bf16=True``, accelerate's autocast);
the first precision is the headline, the others go under ``other_dtypes``.

Output: a table and one JSON line ``{"benchmark": "grpo", "dtype", "ours_s_per_step", "trl_s_per_step",
"speedup", "round_speedups", ..., "other_dtypes": {"bf16": {...}}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time

import torch

PROMPTS, SAMPLES, NEW_TOKENS = 8, 8, 32
ENV = "hybrid_rl/Arithmetic-v0"


def arithmetic_prompts(n: int, seed0: int = 0) -> list[tuple[str, int]]:
    """(observation "a+b=", a+b) of the env's first train seeds, as the env itself renders them."""
    from hybrid_rl import envs

    out = []
    for seed in envs.seeds(ENV, "train", n * (seed0 + 1))[n * seed0:]:
        env = envs.make(ENV)
        obs, _ = env.reset(seed=seed)
        a, b = (int(x) for x in obs.rstrip("=").split("+"))
        out.append((obs, a + b))
        env.close()
    return out


def reward_of(text: str, answer: int) -> float:
    from hybrid_rl.envs import first_int

    return float(first_int(text) == answer)


def bench_ours(steps: int, threads: int, dtype: str = "fp32") -> list[float]:
    from hybrid_rl.config import load_config
    from hybrid_rl.distributed import LocalProcess, adamw
    from hybrid_rl.model import HybridConfig, HybridLM
    from hybrid_rl.model.tokenizer import ByteTokenizer
    from hybrid_rl.rl.config import RLStageConfig
    from hybrid_rl.rollout.pool import LocalPool
    from hybrid_rl.rl.train import make_batch, policy_update, train_requests
    from hybrid_rl.rollout.config import EpisodeConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(RLStageConfig, None, [
        "model.preset=tiny", f"envs=[{ENV}]", f"rollout.prompts_per_step={PROMPTS}", f"rollout.samples_per_prompt={SAMPLES}",
        f"rollout.max_turn_tokens={NEW_TOKENS}", "rollout.max_episode_tokens=128", "train.micro_batch_tokens=8192",
        "train.lr=1e-5", "algo.skip_zero_advantage=false", f"train.dtype={dtype}"])  # TRL trains on every completion
    model = HybridLM(HybridConfig.from_preset("tiny")).train()
    tokenizer = ByteTokenizer()
    optimizer = adamw(model.parameters(), lr=cfg.train.lr)  # the trainer's (fused where it can be, like TRL's default)
    episode = EpisodeConfig(max_turn_tokens=NEW_TOKENS, max_episode_tokens=128, max_batch_episodes=PROMPTS * SAMPLES)
    pool = LocalPool(model, tokenizer, cfg.rollout.sampling, episode, seed=0)
    times, phases = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        pool.push_weights(model.state_dict(), step)
        trajectories = pool.run_groups(train_requests(cfg, step))
        t1 = time.perf_counter()
        batch, _ = make_batch(trajectories, cfg, tokenizer.pad_id)
        policy_update(model, optimizer, batch, cfg, par=LocalProcess(cfg.train.dtype))
        model.moe_balance_update(1e-3)
        times.append(time.perf_counter() - t0)
        phases.append({"rollout_s": round(t1 - t0, 3), "update_s": round(time.perf_counter() - t1, 3),
                       "tokens": sum(t.num_tokens for t in trajectories)})
    pool.close()
    return times, phases


def bench_trl(steps: int, threads: int, workdir: str, dtype: str = "fp32") -> list[float]:
    import datasets
    from transformers import NemotronHForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from hybrid_rl.model import HybridConfig, HybridLM
    from hybrid_rl.model.hf import transformers_config
    from hybrid_rl.model.hybrid import hf_state_dict
    from hybrid_rl.model.tokenizer import ByteTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    c = HybridConfig.from_preset("tiny")
    hf_cfg = transformers_config(c)  # the `tiny` preset as transformers' NemotronH config, dt clamp included
    model = NemotronHForCausalLM(hf_cfg).float()
    model.load_state_dict(hf_state_dict(HybridLM(c)), strict=True)  # the same initial weights as our side
    tokenizer = ByteTokenizer().to_hf()
    tokenizer.padding_side = "left"
    prompts = arithmetic_prompts(PROMPTS * steps)
    answers = {obs: ans for obs, ans in prompts}
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": obs}], "obs": obs} for obs, _ in prompts])

    def reward(completions, obs, **_):
        return [reward_of(c[0]["content"] if isinstance(c, list) else c, answers[o]) for c, o in zip(completions, obs)]

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(output_dir=workdir, per_device_train_batch_size=PROMPTS * SAMPLES, num_generations=SAMPLES,
                      max_completion_length=NEW_TOKENS, gradient_accumulation_steps=1, max_steps=steps,
                      learning_rate=1e-5, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                      bf16=dtype == "bf16", seed=0, dataloader_num_workers=0, shuffle_dataset=False, disable_tqdm=True,
                      # TRL's default (True) recomputes the forward in the backward; our update keeps its activations
                      gradient_checkpointing=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer,
                          callbacks=[Timer()])
    with contextlib.redirect_stdout(sys.stderr):  # its per-step log dicts; stdout carries only our JSON line
        trainer.train()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybrid-rl bench grpo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps per side; the first is warm-up")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both sides")
    parser.add_argument("--skip-trl", action="store_true", help="only time our loop")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the pair this many times, the sides alternating; the ratio is the median of the rounds'")
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32"],
                        help="training precisions, each on both sides (ours: train.dtype; TRL: bf16=True); the "
                             "first is the headline, the others go under their name in the JSON")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is warm-up)")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    result = {"benchmark": "grpo", "model": "tiny", "env": ENV, "prompts": PROMPTS, "samples": SAMPLES,
              "max_new_tokens": NEW_TOKENS, "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
              "trl_gradient_checkpointing": False, **versions()}
    for i, dtype in enumerate(args.dtypes):
        one = compare(args, dtype)
        if i == 0:
            result.update(one, dtype=dtype)
        else:
            result.setdefault("other_dtypes", {})[dtype] = one
        print(f"one GRPO step ({PROMPTS} prompts x {SAMPLES} samples, <= {NEW_TOKENS} new tokens, tiny model, "
              f"{args.threads} threads, {dtype}): ours {one['ours_s_per_step']:.2f} s"
              + (f", TRL {one['trl_s_per_step']:.2f} s, ratio {one['speedup']:.2f}x" if "speedup" in one else "")
              + (f" (median of the rounds' {', '.join(f'{x:.2f}x' for x in one['round_speedups'])})"
                 if "round_speedups" in one else ""),
              file=sys.stderr)
    print(json.dumps(result))
    return 0


def versions() -> dict:
    """What the figures were measured with: the commit and the libraries on both sides."""
    import importlib.metadata

    from hybrid_rl.benchmarks.record import provenance

    return {**provenance(), "torch": torch.__version__,
            **{name: importlib.metadata.version(name) for name in ("transformers", "trl")}}


def compare(args, dtype: str) -> dict:
    """Both sides at one training precision, ``args.rounds`` times alternating: their step times and the ratio."""
    rounds = [compare_once(args, dtype) for _ in range(args.rounds)]
    if len(rounds) == 1:
        return rounds[0]

    def kept(key):  # every round's step times after its warm-up step
        return [t for r in rounds for t in r[key][1:]]

    out = {"ours_s_per_step": statistics.median(kept("ours_steps_s")),
           "ours_steps_s": [t for r in rounds for t in r["ours_steps_s"]],
           "ours_phases": [p for r in rounds for p in r["ours_phases"]]}
    if "speedup" in rounds[0]:
        out.update(trl_s_per_step=statistics.median(kept("trl_steps_s")),
                   trl_steps_s=[t for r in rounds for t in r["trl_steps_s"]],
                   round_speedups=[round(r["speedup"], 3) for r in rounds],
                   speedup=statistics.median(r["speedup"] for r in rounds))
    return out


def compare_once(args, dtype: str) -> dict:
    """One round: our loop, then TRL's, from the same initial weights; their step times and the ratio."""
    ours, phases = bench_ours(args.steps, args.threads, dtype)
    out = {"ours_s_per_step": statistics.median(ours[1:]), "ours_steps_s": [round(t, 3) for t in ours],
           "ours_phases": phases}
    if not args.skip_trl:
        with tempfile.TemporaryDirectory() as workdir:
            trl_times = bench_trl(args.steps, args.threads, workdir, dtype)
        out.update(trl_s_per_step=statistics.median(trl_times[1:]), trl_steps_s=[round(t, 3) for t in trl_times])
        out["speedup"] = out["trl_s_per_step"] / out["ours_s_per_step"]
    return out


if __name__ == "__main__":
    sys.exit(main())

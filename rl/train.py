"""The GRPO loop (``hybrid-rl rl``), flat, top to bottom. Each step:

    push weights (versioned) -> play prompts_per_step groups of samples_per_prompt episodes
    -> advantages per group -> one AdamW update over micro-batches -> MoE balance update -> log
    -> eval on held-out seeds every eval.every_steps -> checkpoint (atomic, resumable)

Departures from the GRPO paper (Shao et al. 2024), and why:
- Episodes are multi-turn: the reward is the episode return, one advantage per episode broadcast over
  all of its action tokens; observation tokens are context, never trained on.
- One optimizer step per batch by default: a synchronous step is exactly on-policy, the ratio is 1 and
  the clipped loss reduces to REINFORCE with a group baseline (as in nanochat's chat_rl.py). The clip
  matters in async mode, where the batch is one version old, and with ``algo.updates_per_batch > 1``
  (GRPO's mu): the ratio is then taken against the rollout's own log-probs (importance correction,
  clipped as in PPO; the engine computes them with the same model code, ``train/rollout_mismatch_kl``
  shows how far they are from the trainer's).
- No KL penalty by default (beta 0, as DAPO and Dr.GRPO); with ``algo.kl_beta > 0`` a frozen copy of
  the initial policy is the reference.
- Failed episodes (env_error / timeout) are left out of group statistics and of the loss. Episodes with
  advantage 0 (groups whose samples all scored the same) carry no policy gradient and are skipped in the
  update when there is no KL term (``algo.skip_zero_advantage``): the normaliser counts only the trained
  episodes (DAPO's dynamic sampling, without re-sampling).
- Token-mean loss aggregation by default (DAPO / Dr.GRPO); ``algo.loss_agg`` gives the others.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from hybrid_rl.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from hybrid_rl.config import to_dict
from hybrid_rl.metrics import MetricsLogger, env_key
from hybrid_rl.run import make_run_dir, seed_everything
from rl.advantages import get_advantage_fn
from rl.batch import Batch, collate, micro_batches, trim
from rl.config import RLStageConfig
from rl.kl import get_kl_estimator, kl_k3
from rl.losses import ClipRange, aggregate_loss, get_policy_loss, token_entropy, token_logprobs
from rl.pool import make_pool
from rl.routing import routing_mismatch

log = logging.getLogger("hybrid_rl.rl")


# ------------------------------------------------------------------------------ setup


def load_policy(cfg: RLStageConfig):
    """(model, tokenizer, source): the init_from checkpoint (an SFT step_N or run dir), or a fresh model."""
    from model import HybridLM
    from model.hf import load_pretrained
    from model.tokenizer import load_tokenizer

    if not cfg.init_from:
        return HybridLM(cfg.model), load_tokenizer(None), "scratch"
    path = Path(cfg.init_from)
    if not (path / "config.json").is_file():  # a run directory: its newest checkpoint
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"init_from={cfg.init_from}: neither a checkpoint (no config.json) nor a run directory "
                                    "with step_N checkpoints. Pass e.g. runs/<sft-run>/step_200.")
        path = latest
    tokenizer = load_tokenizer(path) if (path / "tokenizer_config.json").is_file() else load_tokenizer(None)
    return load_pretrained(path).float(), tokenizer, str(path)


def train_requests(cfg: RLStageConfig, step: int):
    """This step's groups: prompts_per_env train seeds of each env, chosen by the step alone (resume-exact)."""
    import envs
    from rollout.engine import GroupRequest

    out = []
    per_env = cfg.prompts_per_env
    for e, env_id in enumerate(cfg.envs):
        seeds = envs.seeds(env_id, "train", (step + 1) * per_env)[step * per_env:]
        for j, seed in enumerate(seeds):
            out.append(GroupRequest(env_id, seed, group_id=step * cfg.rollout.prompts_per_step + e * per_env + j,
                                    num_samples=cfg.rollout.samples_per_prompt))
    return out


def evaluate_policy(model, tokenizer, cfg: RLStageConfig) -> tuple[dict[str, float], list]:
    """Episodes (greedy by default) on each env's held-out eval seeds, in this process: (eval/... metrics, trajectories)."""
    from rl.evaluate import evaluate

    metrics, trajectories = evaluate(model, tokenizer, cfg.envs, cfg.eval.episodes_per_env, temperature=cfg.eval.temperature,
                                     max_new_tokens=cfg.rollout.max_new_tokens, max_episode_tokens=cfg.rollout.max_episode_tokens)
    model.moe_balance_update(0.0)  # forget the expert loads counted while evaluating: balancing follows training
    return metrics, trajectories


# ------------------------------------------------------------------------------ one update


def make_batch(trajectories, cfg: RLStageConfig, pad_id: int):
    """Advantages per group, then the trained episodes as one padded Batch (None when nothing to train)."""
    adv_fn = get_advantage_fn(cfg.algo.advantage)
    rewards_n = torch.tensor([t.episode_return for t in trajectories], dtype=torch.float32)
    group_n = torch.tensor([t.group_id for t in trajectories])
    valid_n = torch.tensor([not t.failed and t.num_action_tokens > 0 for t in trajectories])
    adv_n = adv_fn(rewards_n, group_n, valid_n)
    skip = cfg.algo.skip_zero_advantage and cfg.algo.kl_beta == 0  # with a KL term every episode has a gradient
    keep = valid_n & (adv_n != 0) if skip else valid_n
    kept = [t for t, k in zip(trajectories, keep.tolist()) if k]
    stats = {"train/adv_abs_mean": float(adv_n[valid_n].abs().mean()) if valid_n.any() else 0.0,
             "train/trained_episodes_frac": float(keep.float().mean())}
    if not kept:
        return None, stats
    return collate(kept, adv_n[keep], pad_id, with_routing=cfg.algo.routing_replay or kept[0].routed_experts is not None), stats


def policy_update(model, optimizer, batch: Batch, cfg: RLStageConfig, ref_model=None, old_from_rollout: bool = False):
    """One optimizer step over ``batch`` in micro-batches (gradients accumulate); returns train/ metrics."""
    loss_fn, kl_fn = get_policy_loss(cfg.algo.policy_loss), get_kl_estimator(cfg.algo.kl_estimator)
    clip = ClipRange(cfg.algo.clip_eps_low, cfg.algo.clip_eps_high)
    agg = cfg.algo.loss_agg
    n_tokens, n_seqs = float(batch.action_mask_bt.sum()), float(batch.num_rows)
    lengths = [int(m.nonzero().max()) + 1 if m.any() else 1 for m in batch.action_mask_bt]
    sums = dict(loss=0.0, kl=0.0, clipped=0.0, entropy=0.0, mismatch=0.0, mismatch_max=0.0, ratio=0.0, route_diff=0.0, route_n=0.0)
    optimizer.zero_grad(set_to_none=True)
    for rows in micro_batches(lengths, cfg.train.micro_batch_tokens):
        mb = trim(batch.rows(rows))
        mask_bt = mb.action_mask_bt
        replay = mb.routing_btlk if cfg.algo.routing_replay else None
        out = model(mb.input_ids_bt, routing=replay, record_routing=mb.routing_btlk is not None and replay is None)
        logp_bt = token_logprobs(out.logits, mb.target_ids_bt)
        old_logp_bt = mb.rollout_logp_bt if old_from_rollout else logp_bt.detach()
        loss_bt, clipped_bt = loss_fn(logp_bt, old_logp_bt, mb.adv_b, mask_bt, clip)
        loss = aggregate_loss(loss_bt, mask_bt, agg, n_tokens, n_seqs)
        if ref_model is not None and cfg.algo.kl_beta > 0:
            with torch.no_grad():
                ref_logp_bt = token_logprobs(ref_model(mb.input_ids_bt, routing=replay).logits, mb.target_ids_bt)
            kl = aggregate_loss(kl_fn(logp_bt, ref_logp_bt), mask_bt, agg, n_tokens, n_seqs)
            loss = loss + cfg.algo.kl_beta * kl
            sums["kl"] += float(kl)
        loss.backward()
        with torch.no_grad():
            sums["loss"] += float(loss)
            sums["clipped"] += float(clipped_bt.sum())
            sums["entropy"] += float((token_entropy(out.logits) * mask_bt).sum())
            sums["mismatch"] += float((kl_k3(mb.rollout_logp_bt, logp_bt) * mask_bt).sum())  # KL(rollout || trainer)
            abs_diff = ((mb.rollout_logp_bt - logp_bt).abs() * mask_bt).max()
            sums["mismatch_max"] = max(sums["mismatch_max"], float(abs_diff))
            sums["ratio"] += float((torch.exp(logp_bt - old_logp_bt) * mask_bt).sum())
            if mb.routing_btlk is not None:
                trainer_routing = out.routed_experts if replay is None else _natural_routing(model, mb)
                diff, n = routing_mismatch(mb.routing_btlk, trainer_routing, mask_bt)
                sums["route_diff"] += diff
                sums["route_n"] += n
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    optimizer.step()
    per_tok = lambda x: x / max(n_tokens, 1)  # noqa: E731
    stats = {"train/loss": sums["loss"], "train/clip_fraction": per_tok(sums["clipped"]), "train/entropy": per_tok(sums["entropy"]),
             "train/ratio_mean": per_tok(sums["ratio"]), "train/grad_norm": grad_norm,
             "train/rollout_mismatch_kl": per_tok(sums["mismatch"]),
             "train/rollout_logprob_diff_max": sums["mismatch_max"]}
    if ref_model is not None and cfg.algo.kl_beta > 0:
        stats["train/kl"] = sums["kl"]
    if sums["route_n"]:
        stats["train/routing_mismatch"] = sums["route_diff"] / sums["route_n"]
    return stats


@torch.no_grad()
def _natural_routing(model, mb: Batch):
    """The experts the trainer would pick without replay (one extra forward, for the mismatch metric only)."""
    return model(mb.input_ids_bt, record_routing=True).routed_experts


def rollout_metrics(trajectories, version: int) -> dict[str, float]:
    """rollout/ metrics of a step (per env and overall) and the batch's staleness, as in docs/METRICS.md."""
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else 0.0  # noqa: E731
    out: dict[str, float] = {}
    for env_id in sorted({t.env_id for t in trajectories}):
        ts = [t for t in trajectories if t.env_id == env_id]
        ok = [t for t in ts if not t.failed]
        key = env_key(env_id)
        out[f"rollout/reward/{key}"] = mean([t.episode_return for t in ok])
        out[f"rollout/success/{key}"] = mean([float(t.success) for t in ok])
        out[f"rollout/turns/{key}"] = mean([t.num_turns for t in ok])
        out[f"rollout/invalid_actions/{key}"] = mean([t.num_invalid_actions for t in ok])
        out[f"rollout/env_errors/{key}"] = mean([float(t.status == "env_error") for t in ts])
        out[f"rollout/timeouts/{key}"] = mean([float(t.status == "timeout") for t in ts])
    ok = [t for t in trajectories if not t.failed]
    groups: dict[int, set[float]] = {}
    for t in ok:
        groups.setdefault(t.group_id, set()).add(t.episode_return)
    versions = [v for t in trajectories for v, a in zip(t.policy_version, t.is_action) if a]
    out.update({
        "rollout/reward": mean([t.episode_return for t in ok]),
        "rollout/success": mean([float(t.success) for t in ok]),
        "rollout/turns": mean([t.num_turns for t in ok]),
        "rollout/zero_std_groups": mean([float(len(r) == 1) for r in groups.values()]),
        "rollout/tokens_per_episode": mean([t.num_action_tokens for t in trajectories]),
        "train/staleness_mean": mean([version - v for v in versions]),
        "train/staleness_max": float(max((version - v for v in versions), default=0)),
    })
    return out


# ------------------------------------------------------------------------------ the loop


def train(cfg: RLStageConfig) -> dict:
    """Run the RL stage; returns {"run_dir", "checkpoint", "eval": {...}} of the final policy."""
    from rollout.config import EpisodeConfig

    seed_everything(cfg.run.seed)
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    run_dir = make_run_dir(cfg.run, "rl", cfg, resume=cfg.resume)
    model, tokenizer, source = load_policy(cfg)
    model.train()
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.algo.kl_beta > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                                  weight_decay=cfg.train.weight_decay)
    start_step = 0
    if cfg.resume and (ckpt := latest_checkpoint(run_dir)) is not None:
        from model.hf import load_pretrained

        model.load_state_dict(load_pretrained(ckpt).float().state_dict())
        state = load_trainer_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
        log.info("resumed %s at step %d", ckpt, start_step)
    log.info("RL from %s: %s, %d x %d episodes per step, %d steps -> %s", source, cfg.envs,
             cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt, cfg.train.steps, run_dir)

    metrics = MetricsLogger(cfg.logging, run_dir, run_dir.name, to_dict(cfg), group=cfg.run.group, tags=cfg.run.tags)
    episode = EpisodeConfig(max_turn_tokens=cfg.rollout.max_new_tokens, max_episode_tokens=cfg.rollout.max_episode_tokens,
                            max_batch_episodes=cfg.rollout.episodes_per_step, env_timeout_s=cfg.rollout.env_timeout_s,
                            end_on_invalid_action=cfg.rollout.end_on_invalid_action, record_routing=cfg.algo.routing_replay)
    pool = make_pool(model, tokenizer, cfg.rollout.sampling, episode, cfg.rollout.pool, seed=cfg.run.seed)
    pad_id = int(getattr(tokenizer, "pad_id", 0) or 0)
    is_async = cfg.algo.mode == "async"
    executor = ThreadPoolExecutor(max_workers=1) if is_async else None
    final_eval: dict[str, float] = {}
    try:
        if cfg.eval.at_start and start_step == 0:
            final_eval, eval_trajs = evaluate_policy(model, tokenizer, cfg)
            metrics.log(final_eval, step=0)
            metrics.log_samples([_sample_row(t) for t in eval_trajs[:4]], step=0)

        def push_and_play(weights, version, play_step):  # policy version = updates applied so far
            t0 = time.perf_counter()
            pool.push_weights(weights, version)
            t1 = time.perf_counter()
            trajs = pool.run_groups(train_requests(cfg, play_step))
            return trajs, t1 - t0, time.perf_counter() - t1

        snapshot = lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}  # noqa: E731 (taken between updates)
        pending = executor.submit(push_and_play, snapshot(), start_step, start_step) if is_async else None
        for step in range(start_step, cfg.train.steps):
            t_step = time.perf_counter()
            if is_async:  # this batch was played by version step-1 (step 0: version 0) while step-1 trained
                trajs, sync_s, rollout_s = pending.result()
                if step + 1 < cfg.train.steps:
                    pending = executor.submit(push_and_play, snapshot(), step, step + 1)
            else:
                trajs, sync_s, rollout_s = push_and_play(snapshot(), step, step)
            t_train = time.perf_counter()
            batch, batch_stats = make_batch(trajs, cfg, pad_id)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            update_stats = {}
            for _ in range(cfg.algo.updates_per_batch if batch is not None else 0):  # the last update's stats are logged
                update_stats = policy_update(model, optimizer, batch, cfg, ref_model,
                                             old_from_rollout=is_async or cfg.algo.updates_per_batch > 1)
            moe_stats = model.moe_balance_update(cfg.train.moe_bias_update_rate) if cfg.train.moe_bias_update_rate else {}
            train_s = time.perf_counter() - t_train
            row = {**rollout_metrics(trajs, step), **batch_stats, **update_stats, **moe_stats,
                   "train/lr": lr_at(step, cfg), "perf/rollout_s": rollout_s, "perf/train_s": train_s,
                   "perf/weight_sync_s": sync_s, "perf/step_s": time.perf_counter() - t_step,
                   "perf/rollout_tokens_per_s": sum(t.num_tokens for t in trajs) / max(rollout_s, 1e-9),
                   "perf/tokens_per_s": sum(t.num_tokens for t in trajs) / max(time.perf_counter() - t_step, 1e-9)}
            done = step + 1
            if (cfg.eval.every_steps and done % cfg.eval.every_steps == 0) or done == cfg.train.steps:
                final_eval, _ = evaluate_policy(model, tokenizer, cfg)
                row.update(final_eval)
            metrics.log(row, step=done)
            metrics.log_samples([_sample_row(t) for t in trajs[:: max(1, len(trajs) // 4)]], step=done)
            if (cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0) or done == cfg.train.steps:
                save_rl_checkpoint(run_dir, done, model, tokenizer, optimizer, cfg.checkpoint.keep_last)
    finally:
        if executor is not None:
            executor.shutdown(wait=True)
        pool.close()
        metrics.close()
    ckpt = latest_checkpoint(run_dir)
    return {"run_dir": str(run_dir), "checkpoint": str(ckpt) if ckpt else "", "eval": final_eval}


def lr_at(step: int, cfg: RLStageConfig) -> float:
    """Linear warmup over train.warmup_steps, then constant (set by hand each step: resume needs only the step)."""
    warmup = cfg.train.warmup_steps
    return cfg.train.lr * min(1.0, (step + 1) / warmup) if warmup else cfg.train.lr


def save_rl_checkpoint(run_dir, step, model, tokenizer, optimizer, keep_last):
    from model.hf import save_pretrained

    state = {"optimizer": optimizer.state_dict(), "step": step}
    return save_checkpoint(run_dir, step, lambda d: save_pretrained(model, d, tokenizer), state, keep_last=keep_last)


def _sample_row(t) -> dict:
    return {"env_id": t.env_id, "seed": t.seed, "status": t.status, "return": t.episode_return, "success": t.success,
            "num_turns": t.num_turns, "messages": t.messages}

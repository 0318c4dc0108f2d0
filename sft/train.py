"""The SFT loop, top to bottom: data -> packed micro-batches -> token-normalised loss -> AdamW step.

One function, ``train(cfg)``, read in order:

1. accelerate: device, bf16 autocast on GPU, DDP when started with ``accelerate launch`` (gloo on CPU).
2. the run directory, the tokenizer, the model (random init, ``init_from`` weights, or the latest
   ``step_N`` of this run when ``resume=true``).
3. data: sources -> validated, rendered samples (``sft.data``) -> a deterministic stream of packed
   micro-batches (``sft.packing``); the data cursor is the index of the next global micro-batch.
4. per optimizer step: each process takes its ``grad_accum_steps`` micro-batches of the step, the
   trained-token count of the whole step is summed over processes, and every micro-batch backpropagates
   ``loss_sum * world_size / n_tokens_step``: the gradient of the mean token loss of the global batch,
   whatever the packing, the micro-batch size or the process count.
5. clip, AdamW with warmup + cosine (``lr_at``), the MoE aux-loss-free bias update from the expert loads
   of the step (summed over processes so every replica moves its biases alike), metrics.
6. every ``eval_every`` steps: greedy episodes on held-out eval seeds (rollout's engine, the same
   rendering as training); every ``save_every`` steps: ``step_N/`` (HF files + trainer_state.pt).

Departures from a textbook SFT loop: the learning rate is set by hand each step (no scheduler object,
so resume only needs the step), and DDP does not broadcast buffers (the MoE biases and load counters
are kept in sync by the all-reduce of step 5 instead).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from hybrid_rl.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from hybrid_rl.config import to_dict
from hybrid_rl.run import make_run_dir, seed_everything
from sft.config import SFTStageConfig
from sft.data import load_samples
from sft.packing import IGNORE, MicroBatchStream, loss_sum

log = logging.getLogger("hybrid_rl.sft")

__all__ = ["train", "lr_at", "evaluate"]


def lr_at(step: int, cfg) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``lr * min_lr_ratio`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def evaluate(model, tokenizer, env_ids: list[str], episodes_per_env: int, max_new_tokens: int) -> tuple[dict, list]:
    """Greedy episodes on each env's held-out eval seeds: ``eval/...`` metrics and the trajectories."""
    import envs
    from hybrid_rl.metrics import env_key
    from rollout.config import EpisodeConfig, SamplingConfig
    from rollout.engine import Engine, GroupRequest

    was_training = model.training
    model.eval()
    engine = Engine(model, tokenizer, SamplingConfig(temperature=0.0, seed=0), EpisodeConfig(max_turn_tokens=max_new_tokens))
    try:
        requests = [GroupRequest(env_id, seed, group_id=k) for env_id in env_ids
                    for k, seed in enumerate(envs.seeds(env_id, "eval", episodes_per_env))]
        with torch.no_grad():
            trajs = engine.play(requests)
    finally:
        engine.close()
        model.train(was_training)
    model.moe_balance_update(0.0)  # drop the expert loads counted while decoding: balancing follows training only
    metrics = {}
    for env_id in env_ids:
        mine = [t for t in trajs if t.env_id == env_id]
        key = env_key(env_id)
        metrics[f"eval/success/{key}"] = sum(t.success for t in mine) / len(mine)
        metrics[f"eval/return/{key}"] = sum(t.episode_return for t in mine) / len(mine)
        metrics[f"eval/turns/{key}"] = sum(t.num_turns for t in mine) / len(mine)
    metrics["eval/success"] = sum(metrics[f"eval/success/{env_key(e)}"] for e in env_ids) / len(env_ids)
    return metrics, trajs


def train(cfg: SFTStageConfig) -> dict:
    """Run the SFT stage; returns a summary (run dir, eval at start/end, wall time, steps)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import broadcast_object_list

    from hybrid_rl.metrics import MetricsLogger, config_dict
    from model import HybridLM
    from model.hf import load_pretrained, save_pretrained
    from model.tokenizer import ByteTokenizer

    t_start = time.time()
    tc = cfg.train
    mixed = tc.mixed_precision if tc.mixed_precision != "auto" else ("bf16" if torch.cuda.is_available() else "no")
    acc = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    world, rank, is_main = acc.num_processes, acc.process_index, acc.is_main_process

    # ---------------------------------------------------------------- run dir, model, resume state
    run_dir = Path(cfg.run.output_dir) / cfg.run.name if cfg.run.name else None
    if is_main:
        run_dir = make_run_dir(cfg.run, "sft", cfg, resume=cfg.resume)
    run_dir = Path(broadcast_object_list([str(run_dir)])[0])  # the main process's (timestamped) name
    resume_dir = latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and resume_dir is None:
        log.warning("resume=true but %s has no step_N checkpoint yet; starting from step 0", run_dir)
    seed_everything(cfg.run.seed)
    tokenizer = ByteTokenizer()
    source = resume_dir or cfg.init_from
    model = load_pretrained(source).train() if source else HybridLM(cfg.model)
    if source and cfg.init_from and model.config.layer_pattern != cfg.model.layer_pattern:
        log.info("init_from %s: the checkpoint's model shape is used (model.* in the config is ignored)", source)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={model.config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")

    samples, report = load_samples(cfg.data, tokenizer, demos_path=run_dir / "demonstrations.jsonl" if is_main else None)
    docs = [(s.ids, s.mask) for s in samples]
    fingerprint = hashlib.sha256(repr(docs).encode()).hexdigest()[:16]
    stream = MicroBatchStream(docs, cfg.data.max_seq_tokens, cfg.rows_per_micro_batch, cfg.run.seed, tokenizer.pad_id)
    log.info("%d samples, %d rows of %d tokens (%.0f%% filled), %d micro-batches per epoch, %d processes",
             len(samples), len(stream.rows), cfg.data.max_seq_tokens, 100 * stream.fill(),
             stream.micro_batches_per_epoch, world)

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr_at(0, tc), betas=(tc.beta1, tc.beta2), fused=False)
    step, cursor = 0, 0  # optimizer steps done; next global micro-batch index
    if resume_dir is not None:
        state = load_trainer_state(resume_dir)  # restores the RNGs too
        optimizer.load_state_dict(state["optimizer"])
        step, cursor = state["step"], state["cursor"]
        if state.get("data_fingerprint") != fingerprint:
            log.warning("the training data differs from the data of the checkpoint; the data cursor may point elsewhere")
        log.info("resumed from %s at step %d (micro-batch %d)", resume_dir, step, cursor)
    model, optimizer = acc.prepare(model, optimizer)
    core = acc.unwrap_model(model)

    logger = None
    if is_main:
        logger = MetricsLogger(cfg.logging, run_dir, run_dir.name, config_dict(cfg), group=cfg.run.group, tags=cfg.run.tags)
        logger.log({**report.metrics(), "train/samples": len(samples), "train/packing_fill": stream.fill()}, step)
    summary = {"run_dir": str(run_dir), "start_step": step, "eval_start": None, "eval_end": None}
    eval_env_ids = cfg.eval_env_ids

    def run_eval():
        metrics, trajs = evaluate(core, tokenizer, eval_env_ids, cfg.eval.episodes_per_env, cfg.eval.max_new_tokens)
        logger.log(metrics, step)
        logger.log_samples([{"env_id": t.env_id, "seed": t.seed, "success": t.success, "messages": t.messages}
                            for t in trajs[:4]], step)
        log.info("step %d eval: %s", step, "  ".join(f"{k.split('/', 1)[1]}={v:.2f}" for k, v in metrics.items()
                                                     if k.startswith("eval/success")))
        return metrics

    def save():
        state = {"optimizer": optimizer.state_dict(), "step": step, "cursor": cursor,
                 "data_fingerprint": fingerprint, "world_size": world, "config": to_dict(cfg)}
        if is_main:
            path = save_checkpoint(run_dir, step, lambda d: save_pretrained(core, d, tokenizer), state,
                                   keep_last=tc.keep_last_checkpoints)
            log.info("saved %s", path)
        acc.wait_for_everyone()

    if is_main and eval_env_ids and cfg.eval.at_start and step == 0:
        summary["eval_start"] = run_eval()
    acc.wait_for_everyone()

    # ---------------------------------------------------------------- the loop
    model.train()
    t_last, tokens_since = time.time(), 0
    while step < tc.max_steps:
        first = cursor + rank * tc.grad_accum_steps  # this process's micro-batches of the step
        batches = [stream.micro_batch_at(first + g) for g in range(tc.grad_accum_steps)]
        n_local = sum(int((b["targets"] != IGNORE).sum()) for b in batches)
        n_tokens = int(acc.reduce(torch.tensor(n_local, device=acc.device), "sum"))
        loss_total = torch.zeros((), device=acc.device)
        for g, b in enumerate(batches):
            b = {k: v.to(acc.device) for k, v in b.items()}
            sync = acc.no_sync(model) if g < len(batches) - 1 else nullcontext()
            with sync, acc.autocast():
                logits = model(b["input_ids"], doc_ids=b["doc_ids"]).logits
                loss_mb = loss_sum(logits, b["targets"])
            acc.backward(loss_mb * world / max(n_tokens, 1))
            loss_total += loss_mb.detach()
            tokens_since += int((b["input_ids"] != tokenizer.pad_id).sum())
        grad_norm = acc.clip_grad_norm_(model.parameters(), tc.max_grad_norm) if tc.max_grad_norm > 0 else _grad_norm(model)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, tc)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:  # every replica must see the same expert loads, so biases stay identical
            for buf in (m.expert_load for m in core.modules() if hasattr(m, "expert_load")):
                torch.distributed.all_reduce(buf)
        moe_stats = core.moe_balance_update(tc.moe_bias_update_rate)
        loss = float(acc.reduce(loss_total, "sum")) / max(n_tokens, 1)
        step += 1
        cursor += tc.grad_accum_steps * world

        if is_main and (step % tc.log_every == 0 or step == tc.max_steps or step == 1):
            dt = time.time() - t_last
            logger.log({"train/loss": loss, "train/lr": lr_at(step - 1, tc), "train/grad_norm": float(grad_norm),
                        "train/trained_tokens": n_tokens, "train/epoch": cursor / stream.micro_batches_per_epoch,
                        "perf/tokens_per_s": tokens_since * world / dt, "perf/elapsed_s": time.time() - t_start,
                        **moe_stats}, step)
            t_last, tokens_since = time.time(), 0
        if not math.isfinite(loss):
            raise FloatingPointError(f"train/loss is {loss} at step {step}; lower train.lr or check the data")
        if tc.save_every and step % tc.save_every == 0 and step < tc.max_steps:
            save()
        if is_main and eval_env_ids and tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
            run_eval()
            t_last = time.time()
        acc.wait_for_everyone()

    if step > summary["start_step"] or not latest_checkpoint(run_dir):
        save()
    if is_main:
        if eval_env_ids:
            summary["eval_end"] = run_eval()
        summary.update(steps=step, wall_s=time.time() - t_start, checkpoint=str(run_dir / f"step_{step}"))
        logger.log({"perf/wall_s": summary["wall_s"]}, step)
        logger.close()
    acc.wait_for_everyone()
    acc.end_training()
    return summary


def _grad_norm(model) -> torch.Tensor:
    grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())

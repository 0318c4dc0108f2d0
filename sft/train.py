"""The SFT loop, top to bottom: data -> packed micro-batches -> token-normalised loss -> AdamW step.

``train(cfg)`` reads in the shape of the RL loop (rl/train.py): setup, then a flat loop over
``train_step``, with eval and checkpoints between steps.

1. the trainer core (hybrid_rl/distributed.py): device, ``train.strategy`` (single, ddp, fsdp) over
   ``train.processes`` processes (started by the command itself, or by torchrun / accelerate launch),
   ``train.dtype`` (bf16 on GPU by default), activation checkpointing.
2. the run directory, the model (random init, ``init_from`` weights, or the latest ``step_N`` of this run
   when ``resume=true``) and the tokenizer saved beside those weights (the byte tokenizer when there is none).
3. data: sources -> validated, rendered samples (``hybrid_rl.sft.data``) -> a deterministic stream of packed
   micro-batches (``hybrid_rl.sft.packing``); the data cursor is the index of the next global micro-batch.
4. per optimizer step (``train_step``): each process takes its ``grad_accum_steps`` micro-batches of the
   step, the trained-token count of the whole step is summed over processes, and every micro-batch
   backpropagates ``model_loss_sum * world_size / n_tokens_step``: the gradient of the mean token loss of the
   global batch, whatever the packing, the micro-batch size or the process count.
5. clip, AdamW with warmup + cosine (``lr_at``), the MoE aux-loss-free bias update from the expert loads
   of the step (summed over processes so every replica moves its biases alike), metrics.
6. every ``eval_every`` steps: greedy episodes on held-out eval seeds (rollout's engine, the same
   rendering as training); every ``save_every`` steps: ``step_N/`` (HF files + trainer_state.pt).

Departures from a textbook SFT loop: the learning rate is set by hand each step (no scheduler object,
so resume only needs the step), and DDP does not broadcast buffers (the MoE biases and load counters
are kept in sync by the all-reduce of step 5 instead). Checkpoints hold full weights and an optimizer
state keyed by parameter name, so a run resumes under another strategy or process count.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hybrid_rl.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from hybrid_rl.config import to_dict
from hybrid_rl.distributed import Parallel, adamw, balance_experts
from hybrid_rl.rollout.evaluate import evaluate_policy, sample_row
from hybrid_rl.run import claim_run_dir, resume_point, seed_everything, start_run_dir
from hybrid_rl.schedule import warmup_cosine
from hybrid_rl.sft.config import SFTStageConfig, SFTTrainConfig
from hybrid_rl.sft.data import expert_conversation, load_samples
from hybrid_rl.sft.packing import IGNORE, MicroBatchStream, model_loss_sum

log = logging.getLogger("hybrid_rl.sft")

__all__ = ["train", "train_step", "lr_at", "heldout_loss"]


@dataclass
class Progress:
    """Where a run stands, all that resume needs besides the weights, the optimizer and the RNGs."""

    step: int = 0  # optimizer steps done
    cursor: int = 0  # the next global micro-batch of the stream
    tokens: int = 0  # assistant tokens trained on
    data_fingerprint: str = ""  # of the training documents: a resume on other data is warned about


# ------------------------------------------------------------------------------ setup


def open_run_dir(cfg: SFTStageConfig, par: Parallel) -> tuple[Path, Path | None]:
    """(the run directory, named by the main process and alike on all; the ``step_N`` being resumed, or None).
    Nothing of a previous run is touched here: ``start_run_dir`` replaces its outputs once the inputs loaded."""
    resume_dir = resume_point(cfg.run, "sft") if cfg.resume else None  # a missing or foreign run is refused now
    run_dir = str(claim_run_dir(cfg.run, "sft", resume=cfg.resume)) if par.is_main else None
    return Path(par.broadcast(run_dir)), resume_dir  # the main process's (timestamped) name


def load_model(cfg: SFTStageConfig, resume_dir: Path | None, vocab_size: int):
    """The checkpoint being resumed, else ``init_from``'s weights, else a random init of ``cfg.model``."""
    from hybrid_rl.model import HybridLM
    from hybrid_rl.model.hf import load_pretrained

    source = resume_dir or cfg.init_from
    # fp32 master weights whatever the checkpoint's dtype (train.dtype=bf16 is autocast over them)
    model = load_pretrained(source).float().train() if source else HybridLM(cfg.model)
    if source and cfg.init_from and model.config.layer_pattern != cfg.model.layer_pattern:
        log.info("init_from %s: the checkpoint's model shape is used (model.* in the config is ignored)", source)
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={model.config.vocab_size} is smaller than the tokenizer's {vocab_size}")
    return model


def make_optimizer(model, tc: SFTTrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases, the MoE selection bias)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return adamw([{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                 lr=lr_at(0, tc), betas=(tc.beta1, tc.beta2))


def restore(resume_dir: Path | None, par: Parallel, optimizer, fingerprint: str) -> Progress:
    """The progress (and optimizer state and RNGs) of ``resume_dir``; a fresh start when there is none.
    Called after ``par.wrap``, so the optimizer state follows the parameters' device and shards."""
    if resume_dir is None:
        return Progress(data_fingerprint=fingerprint)
    state = load_trainer_state(resume_dir)  # restores the RNGs too
    par.load_optimizer_state(optimizer, state["optimizer"])
    if state.get("data_fingerprint") != fingerprint:
        log.warning("the training data differs from the data of the checkpoint; the data cursor may point elsewhere")
    log.info("resumed from %s at step %d (micro-batch %d)", resume_dir, state["step"], state["cursor"])
    return Progress(state["step"], state["cursor"], state["tokens"], fingerprint)


def lr_at(step: int, cfg) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``lr * min_lr_ratio`` at ``max_steps``."""
    return warmup_cosine(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)


# ------------------------------------------------------------------------------ one step


def train_step(model, optimizer, par: Parallel, stream: MicroBatchStream, progress: Progress, tc: SFTTrainConfig) -> dict:
    """One optimizer step on this process's micro-batches of the step at ``progress``; returns the step's
    loss (mean over the global batch's trained tokens), its trained-token count and grad norm."""
    first = progress.cursor + par.rank * tc.grad_accum_steps  # this process's micro-batches of the step
    batches = [stream.micro_batch_at(first + g) for g in range(tc.grad_accum_steps)]
    n_local = sum(int((b["targets"] != IGNORE).sum()) for b in batches)
    (n_tokens,) = par.sum([n_local])
    loss_total = 0.0
    for g, b in enumerate(batches):
        b = {k: v.to(par.device) for k, v in b.items()}
        with par.no_sync(last=g == len(batches) - 1):
            with par.autocast():
                loss_mb = model_loss_sum(model, b)
            par.backward(loss_mb * par.world / max(n_tokens, 1))
        loss_total += float(loss_mb.detach())
    grad_norm = par.clip_grad_norm_(model.parameters(), tc.max_grad_norm if tc.max_grad_norm > 0 else math.inf)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(progress.step, tc)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    (loss_total,) = par.sum([loss_total])
    return {"loss": loss_total / max(n_tokens, 1), "tokens": int(n_tokens), "grad_norm": grad_norm}


# ------------------------------------------------------------------------------ eval and checkpoints


def run_eval(core, tokenizer, cfg: SFTStageConfig, heldout_docs, logger, step: int) -> dict[str, float]:
    """Greedy episodes on the held-out eval seeds (``eval.split``), and the loss on held-out demonstrations; logged
    at ``step``."""
    metrics, trajs = evaluate_policy(core, tokenizer, cfg.eval_env_ids, cfg.eval.episodes_per_env,
                                     max_turn_tokens=cfg.eval.max_turn_tokens, split=cfg.eval.split,
                                     rollout_like=cfg.eval.turn_rules())
    if heldout_docs:
        metrics["eval/loss"] = heldout_loss(core, heldout_docs, cfg.data.max_seq_tokens, tokenizer.pad_id)
    logger.log(metrics, step)
    logger.log_samples([sample_row(t) for t in trajs[:: max(1, len(trajs) // 4)]], step)
    log.info("step %d eval: %s", step, "  ".join(f"{k[5:]}={v:.3f}" for k, v in metrics.items()
                                                 if k.startswith(("eval/success", "eval/loss"))))
    return metrics


def heldout_loss(model, docs, row_tokens: int, pad_id: int) -> float:
    """Mean loss per assistant token on held-out documents (expert demonstrations on eval seeds), on the model's own
    device (with FSDP the evals run on the main process's full copy, which stays on the CPU)."""
    device = next(model.parameters()).device
    stream = MicroBatchStream(docs, row_tokens, 8, seed=0, pad_id=pad_id)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(stream.micro_batches_per_epoch):
            b = {k: v.to(device) for k, v in stream.micro_batch_at(i).items()}
            total += float(model_loss_sum(model, b))
            count += int((b["targets"] != IGNORE).sum())
    model.train(was_training)
    model.moe_balance_update(0.0)
    return total / max(count, 1)


def heldout_docs(cfg: SFTStageConfig, tokenizer) -> list[tuple[list[int], list[int]]]:
    """Expert demonstrations on the ``eval.split`` seeds of the demonstration envs (for eval/loss): the held-out
    eval seeds, or the val seeds in a run that chooses a recipe."""
    from hybrid_rl import envs

    docs = []
    for env_id in [e.env_id for e in cfg.data.envs if e.env_id in cfg.eval_env_ids]:
        for seed in envs.seeds(env_id, cfg.eval.split, cfg.eval.episodes_per_env):
            messages, _ = expert_conversation(env_id, seed)
            ids, mask = tokenizer.render_chat(messages)
            if len(ids) <= cfg.data.max_seq_tokens:
                docs.append((ids, mask))
    return docs


def save(par: Parallel, run_dir: Path, tokenizer, optimizer, progress: Progress, cfg: SFTStageConfig) -> None:
    """``step_N/``: the full model (HF files), the optimizer state (by parameter name) and the progress,
    written by the main process; all processes take part in gathering them, then wait."""
    from hybrid_rl.model.hf import save_pretrained

    full, optimizer_state = par.full_model(), par.optimizer_state(optimizer)
    if par.is_main:
        state = {"stage": "sft", "optimizer": optimizer_state, **asdict(progress), "world_size": par.world,
                 "config": to_dict(cfg)}
        path = save_checkpoint(run_dir, progress.step, lambda d: save_pretrained(full, d, tokenizer), state,
                               keep_last=cfg.train.keep_last_checkpoints)
        log.info("saved %s", path)
    par.barrier()


# ------------------------------------------------------------------------------ the loop


def train(cfg: SFTStageConfig) -> dict:
    """Run the SFT stage; returns a summary (run dir, eval at start/end, wall time, steps)."""
    t_start, cpu_start = time.time(), time.process_time()
    par = Parallel(cfg.train)
    try:
        return _train_on(cfg, par, t_start, cpu_start)
    finally:  # a run that failed before its loop (a bad input) ends its process state too; else a no-op
        par.close(clean=False)


def _train_on(cfg: SFTStageConfig, par: Parallel, t_start: float, cpu_start: float) -> dict:
    from hybrid_rl.metrics import MetricsLogger
    from hybrid_rl.model.tokenizer import checkpoint_tokenizer

    tc = cfg.train
    world, is_main = par.world, par.is_main
    run_dir, resume_dir = open_run_dir(cfg, par)
    seed_everything(cfg.run.seed)
    tokenizer = checkpoint_tokenizer(resume_dir or cfg.init_from)
    model = load_model(cfg, resume_dir, tokenizer.vocab_size)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)  # for the demonstrations made on the fly
    samples, report = load_samples(cfg.data, tokenizer, demos_path=run_dir / "demonstrations.jsonl" if is_main else None)
    if is_main:  # the inputs loaded: now a previous run's outputs make way (run.overwrite), and config.yaml is written
        start_run_dir(run_dir, cfg.run, cfg, resume=cfg.resume)
    docs = [(s.ids, s.mask) for s in samples]
    stream = MicroBatchStream(docs, cfg.data.max_seq_tokens, cfg.rows_per_micro_batch, cfg.run.seed, tokenizer.pad_id)
    if is_main:
        log.info("%d samples, %d rows of %d tokens (%.0f%% filled), %d micro-batches per epoch, %d processes",
                 len(samples), len(stream.rows), cfg.data.max_seq_tokens, 100 * stream.fill(),
                 stream.micro_batches_per_epoch, world)
    model, optimizer = par.wrap(model, lambda m: make_optimizer(m, tc))
    core = par.core
    progress = restore(resume_dir, par, optimizer, hashlib.sha256(repr(docs).encode()).hexdigest()[:16])
    logger = None  # the main process logs
    if is_main:
        logger = MetricsLogger(cfg.logging, run_dir, run_dir.name, to_dict(cfg), group=cfg.run.group, tags=cfg.run.tags,
                               resume_step=progress.step if resume_dir else None)
        logger.log({**report.metrics(), "train/samples": len(samples), "train/packing_fill": stream.fill()}, progress.step)
    failed = True  # a run that raises (a non-finite loss, an eval error, Ctrl-C) still closes its logger as failed
    try:
        summary = {"run_dir": str(run_dir), "start_step": progress.step, "eval_start": None, "eval_end": None}
        evals = bool(cfg.eval_env_ids)
        eval_docs = heldout_docs(cfg, tokenizer) if is_main else []

        def evaluate(step: int) -> dict | None:
            """The main process evaluates the full weights (gathered from every process under fsdp)."""
            full = par.full_model()
            return run_eval(full, tokenizer, cfg, eval_docs, logger, step) if is_main else None

        if evals and cfg.eval.at_start and progress.step == 0:
            summary["eval_start"] = evaluate(progress.step)
        par.barrier()

        model.train()
        while progress.step < tc.max_steps:
            t_step = time.time()
            out = train_step(model, optimizer, par, stream, progress, tc)
            moe_metrics = balance_experts(core, tc.moe_bias_update_rate, par)
            if not math.isfinite(out["loss"]):
                raise FloatingPointError(f"train/loss is {out['loss']} at step {progress.step + 1}; lower train.lr or check the data")
            progress.step += 1
            progress.cursor += tc.grad_accum_steps * world
            progress.tokens += out["tokens"]
            step, last = progress.step, progress.step == tc.max_steps
            if is_main and (step % tc.log_every == 0 or step == 1 or last):
                step_s = time.time() - t_step
                logger.log({"train/loss": out["loss"], "train/lr": lr_at(step - 1, tc), "train/grad_norm": out["grad_norm"],
                            "train/tokens": progress.tokens, "train/epoch": progress.cursor / stream.micro_batches_per_epoch,
                            "perf/tokens_per_s": tc.micro_batch_tokens * tc.grad_accum_steps * world / step_s,
                            "perf/step_s": step_s, **moe_metrics}, step)
            if tc.save_every and step % tc.save_every == 0 and not last:
                save(par, run_dir, tokenizer, optimizer, progress, cfg)
            if evals and tc.eval_every and step % tc.eval_every == 0 and not last:
                evaluate(step)
            par.barrier()

        if progress.step > summary["start_step"] or not latest_checkpoint(run_dir):
            save(par, run_dir, tokenizer, optimizer, progress, cfg)
        if evals:
            summary["eval_end"] = evaluate(progress.step)
        if is_main:
            summary.update(steps=progress.step, wall_s=time.time() - t_start, checkpoint=str(run_dir / f"step_{progress.step}"))
            logger.log({"perf/wall_s": summary["wall_s"], "perf/cpu_s": time.process_time() - cpu_start}, progress.step)
        failed = False
    finally:
        if logger is not None:
            logger.close(failed=failed)
        par.close(clean=not failed)  # a clean run waits for every process first
    return summary

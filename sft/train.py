"""The SFT loop, top to bottom: data -> packed micro-batches -> token-normalised loss -> AdamW step.

One function, ``train(cfg)``, read in order:

1. accelerate: device, bf16 autocast on GPU, DDP when started with ``accelerate launch`` (gloo on CPU).
2. the run directory, the tokenizer, the model (random init, ``init_from`` weights, or the latest
   ``step_N`` of this run when ``resume=true``).
3. data: sources -> validated, rendered samples (``hybrid_rl.sft.data``) -> a deterministic stream of packed
   micro-batches (``hybrid_rl.sft.packing``); the data cursor is the index of the next global micro-batch.
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
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from hybrid_rl.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from hybrid_rl.config import to_dict
from hybrid_rl.run import make_run_dir, seed_everything
from hybrid_rl.sft.config import SFTStageConfig
from hybrid_rl.sft.data import expert_conversation, load_samples
from hybrid_rl.rollout.evaluate import evaluate_policy, sample_row
from hybrid_rl.sft.packing import IGNORE, MicroBatchStream, loss_sum

log = logging.getLogger("hybrid_rl.sft")

__all__ = ["train", "lr_at", "evaluate"]


def lr_at(step: int, cfg) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``lr * min_lr_ratio`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def heldout_loss(model, docs, row_tokens: int, pad_id: int, device) -> float:
    """Mean loss per assistant token on held-out documents (expert demonstrations on eval seeds)."""
    stream = MicroBatchStream(docs, row_tokens, 8, seed=0, pad_id=pad_id)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(stream.micro_batches_per_epoch):
            b = {k: v.to(device) for k, v in stream.micro_batch_at(i).items()}
            total += float(loss_sum(model(b["input_ids"], doc_ids=b["doc_ids"]).logits, b["targets"]))
            count += int((b["targets"] != IGNORE).sum())
    model.train(was_training)
    model.moe_balance_update(0.0)
    return total / max(count, 1)


def train(cfg: SFTStageConfig) -> dict:
    """Run the SFT stage; returns a summary (run dir, eval at start/end, wall time, steps)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import broadcast_object_list

    from hybrid_rl.metrics import MetricsLogger, moe_load_metrics
    from hybrid_rl.model import HybridLM
    from hybrid_rl.model.hf import load_pretrained, save_pretrained
    from hybrid_rl.model.tokenizer import ByteTokenizer

    t_start, cpu_start = time.time(), time.process_time()
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
    if is_main:
        log.info("%d samples, %d rows of %d tokens (%.0f%% filled), %d micro-batches per epoch, %d processes",
                 len(samples), len(stream.rows), cfg.data.max_seq_tokens, 100 * stream.fill(),
                 stream.micro_batches_per_epoch, world)

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr_at(0, tc), betas=(tc.beta1, tc.beta2), fused=False)
    with warnings.catch_warnings():  # torch renames broadcast_buffers; accelerate's DDP kwargs still use the old name
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        model, optimizer = acc.prepare(model, optimizer)
    core = acc.unwrap_model(model)
    step, cursor, tokens_trained = 0, 0, 0  # optimizer steps done; next global micro-batch; assistant tokens trained
    if resume_dir is not None:
        state = load_trainer_state(resume_dir)  # restores the RNGs too
        optimizer.load_state_dict(state["optimizer"])  # after prepare: the state follows the params' device
        step, cursor, tokens_trained = state["step"], state["cursor"], state["tokens"]
        if state.get("data_fingerprint") != fingerprint:
            log.warning("the training data differs from the data of the checkpoint; the data cursor may point elsewhere")
        log.info("resumed from %s at step %d (micro-batch %d)", resume_dir, step, cursor)

    logger = None
    if is_main:
        logger = MetricsLogger(cfg.logging, run_dir, run_dir.name, to_dict(cfg), group=cfg.run.group, tags=cfg.run.tags)
        logger.log({**report.metrics(), "train/samples": len(samples), "train/packing_fill": stream.fill()}, step)
    summary = {"run_dir": str(run_dir), "start_step": step, "eval_start": None, "eval_end": None}
    eval_env_ids = cfg.eval_env_ids
    heldout_docs = _heldout_docs(cfg, tokenizer) if is_main else []

    def run_eval():
        metrics, trajs = evaluate_policy(core, tokenizer, eval_env_ids, cfg.eval.episodes_per_env,
                                         max_turn_tokens=cfg.eval.max_turn_tokens)
        if heldout_docs:
            metrics["eval/loss"] = heldout_loss(core, heldout_docs, cfg.data.max_seq_tokens, tokenizer.pad_id, acc.device)
        logger.log(metrics, step)
        logger.log_samples([sample_row(t) for t in trajs[:: max(1, len(trajs) // 4)]], step)
        log.info("step %d eval: %s", step, "  ".join(f"{k[5:]}={v:.3f}" for k, v in metrics.items()
                                                     if k.startswith(("eval/success", "eval/loss"))))
        return metrics

    def save():
        state = {"optimizer": optimizer.state_dict(), "step": step, "cursor": cursor, "tokens": tokens_trained,
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
    while step < tc.max_steps:
        t_step = time.time()
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
        grad_norm = acc.clip_grad_norm_(model.parameters(), tc.max_grad_norm if tc.max_grad_norm > 0 else math.inf)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, tc)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        loads = {i: core.backbone.layers[i].mixer.expert_load for i in core.moe_layers}
        if world > 1:  # every replica must see the same expert loads, so that the biases stay identical
            for buf in loads.values():
                torch.distributed.all_reduce(buf)
        moe_metrics = moe_load_metrics({i: buf.cpu() for i, buf in loads.items()})
        core.moe_balance_update(tc.moe_bias_update_rate)
        loss = float(acc.reduce(loss_total, "sum")) / max(n_tokens, 1)
        if not math.isfinite(loss):
            raise FloatingPointError(f"train/loss is {loss} at step {step + 1}; lower train.lr or check the data")
        step += 1
        cursor += tc.grad_accum_steps * world
        tokens_trained += n_tokens
        if is_main and (step % tc.log_every == 0 or step == 1 or step == tc.max_steps):
            step_s = time.time() - t_step
            logger.log({"train/loss": loss, "train/lr": lr_at(step - 1, tc), "train/grad_norm": float(grad_norm),
                        "train/tokens": tokens_trained, "train/epoch": cursor / stream.micro_batches_per_epoch,
                        "perf/tokens_per_s": tc.micro_batch_tokens * tc.grad_accum_steps * world / step_s,
                        "perf/step_s": step_s, **moe_metrics}, step)
        if tc.save_every and step % tc.save_every == 0 and step < tc.max_steps:
            save()
        if is_main and eval_env_ids and tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
            run_eval()
        acc.wait_for_everyone()

    if step > summary["start_step"] or not latest_checkpoint(run_dir):
        save()
    if is_main:
        if eval_env_ids:
            summary["eval_end"] = run_eval()
        summary.update(steps=step, wall_s=time.time() - t_start, checkpoint=str(run_dir / f"step_{step}"))
        logger.log({"perf/wall_s": summary["wall_s"], "perf/cpu_s": time.process_time() - cpu_start}, step)
        logger.close()
    acc.wait_for_everyone()
    acc.end_training()
    return summary


def _heldout_docs(cfg: SFTStageConfig, tokenizer) -> list[tuple[list[int], list[int]]]:
    """Expert demonstrations on the eval seeds of the demonstration envs (for eval/loss)."""
    from hybrid_rl import envs

    docs = []
    for env_id in [e.env_id for e in cfg.data.envs if e.env_id in cfg.eval_env_ids]:
        for seed in envs.seeds(env_id, "eval", cfg.eval.episodes_per_env):
            messages, _ = expert_conversation(env_id, seed)
            ids, mask = tokenizer.render_chat(messages)
            if len(ids) <= cfg.data.max_seq_tokens:
                docs.append((ids, mask))
    return docs

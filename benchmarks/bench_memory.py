"""Memory of the hybrid models: the decode cache against an all-attention twin; with --train, training.

    hybrid-rl bench memory [--presets nemotron3-nano nemotron3-super] [--contexts 8K 128K 1M]
                           [--batch 1] [--kv-dtype bf16] [--json-out PATH]

For each preset and context length: KV cache (bf16 by default), Mamba SSM state (fp32) and conv
window (model dtype), their total, and the total of the *all-attention twin*: the same hidden size,
query/KV heads, head_dim and layer count, with every layer an attention layer (pattern ``*`` x L).
Numbers come from ``model.cache_bytes`` (the analytic size of ``HybridCache``); nothing is allocated.

Context lengths: ``8K`` = 8,192 and ``128K`` = 131,072 tokens (powers of two, as context windows are
quoted), ``1M`` = 1,000,000 tokens (as the "1M-token context" claims are quoted); any integer works.
Prints a table and the result as one JSON line (``--json-out`` also writes it to a file).

    hybrid-rl bench memory --train [--devices 8] [--batch 1] [--seq-len 8K] [--logprob-chunk 1024]
                           [--rollout-batch 16] [--rollout-context 8K] [--check]
                           [--json-out benchmarks/results/memory_train.json]

``--train``: per-device training memory of every preset under DDP and FSDP on N devices, fp32 and bf16,
with and without activation checkpointing, from ``hybrid_rl.model.memory`` (the formula and its
assumptions are in its docstrings; nothing is allocated); then for the Nemotron 3 presets the smallest
count of 80 GB GPUs that holds FSDP bf16 training with checkpointing and chunked log-probs.
``--check`` also measures the peak of real training steps of ``tiny`` and ``small`` on this CPU, each in
a fresh subprocess, and compares it with the formula (``TRAIN_CHECKS``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

from hybrid_rl.benchmarks.record import emit
from hybrid_rl.model.config import HybridConfig
from hybrid_rl.model.memory import TrainSetup, devices_needed, train_memory

DEFAULT_PRESETS = ["nemotron3-nano", "nemotron3-super"]
DEFAULT_CONTEXTS = ["8K", "128K", "1M"]
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}
_SUFFIX = {"K": 1024, "M": 1_000_000}  # see module docstring: 128K = 131072, 1M = 10**6


def parse_context(text: str) -> int:
    t = text.strip().upper()
    try:
        return int(t[:-1]) * _SUFFIX[t[-1]] if t[-1] in _SUFFIX else int(t)
    except ValueError:
        raise ValueError(f"cannot read context length {text!r}; write e.g. 8K, 128K, 1M or 4096") from None


def all_attention_twin(cfg: HybridConfig) -> HybridConfig:
    """Same width, heads, KV heads, head_dim and layer count; attention in every layer."""
    return cfg.replace(layer_pattern="*" * cfg.num_layers, preset="")


def cache_breakdown(cfg: HybridConfig, tokens: int, batch: int = 1, kv_bytes: int = 2, conv_bytes: int = 2) -> dict:
    """Bytes of KV / SSM / conv state, taken apart from ``model.cache_bytes`` by varying its inputs."""
    from hybrid_rl.model import cache_bytes

    total = cache_bytes(cfg, tokens, batch, kv_bytes=kv_bytes, conv_bytes=conv_bytes)
    state = cache_bytes(cfg, 0, batch, kv_bytes=kv_bytes, conv_bytes=conv_bytes)  # constant in context length
    ssm = cache_bytes(cfg, 0, batch, kv_bytes=kv_bytes, conv_bytes=0)
    return {"kv_bytes": total - state, "ssm_bytes": ssm, "conv_bytes": state - ssm, "total_bytes": total}


def measure(presets: list[str], contexts: list[str], batch: int = 1, kv_dtype: str = "bf16") -> dict:
    kv_bytes = DTYPE_BYTES[kv_dtype]
    rows = []
    for preset in presets:
        cfg = HybridConfig.from_preset(preset)
        twin = all_attention_twin(cfg)
        for label in contexts:
            tokens = parse_context(label)
            ours = cache_breakdown(cfg, tokens, batch, kv_bytes)
            dense = cache_breakdown(twin, tokens, batch, kv_bytes)
            rows.append({
                "preset": preset, "context": label, "tokens": tokens, "batch": batch,
                "attention_layers": cfg.layer_pattern.count("*"), "mamba_layers": cfg.layer_pattern.count("M"),
                "layers": cfg.num_layers, **ours,
                "all_attention_total_bytes": dense["total_bytes"],
                "ratio_all_attention_over_hybrid": dense["total_bytes"] / ours["total_bytes"],
            })
    return {"benchmark": "memory", "kv_dtype": kv_dtype, "ssm_dtype": "fp32", "conv_dtype": "bf16",
            "note": "all-attention twin: same hidden/heads/kv-heads/head_dim/layer count, every layer attention",
            "rows": rows}


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def aligned(head: list[str], lines: list[list], left: int = 2) -> list[str]:
    """Rows of cells as text columns: the first ``left`` columns left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    render = lambda cells: "  ".join(str(c).rjust(w) if i >= left else str(c).ljust(w)  # noqa: E731
                                     for i, (c, w) in enumerate(zip(cells, widths)))
    return [render(head), render(["-" * w for w in widths]), *map(render, lines)]


def table(result: dict) -> str:
    head = ["preset", "context", "tokens", "KV", "SSM", "conv", "total", "all-attention", "ratio"]
    lines = [[r["preset"], r["context"], f"{r['tokens']:,}", fmt_bytes(r["kv_bytes"]), fmt_bytes(r["ssm_bytes"]),
              fmt_bytes(r["conv_bytes"]), fmt_bytes(r["total_bytes"]), fmt_bytes(r["all_attention_total_bytes"]),
              f"{r['ratio_all_attention_over_hybrid']:.1f}x"] for r in result["rows"]]
    batch = result["rows"][0]["batch"] if result["rows"] else 1
    title = f"decode cache per {batch} sequence(s): KV {result['kv_dtype']}, SSM fp32, conv bf16"
    return "\n".join([title, *aligned(head, lines)])


# ----------------------------------------------------------------------------- training memory (--train)
TRAIN_PRESETS = HybridConfig.preset_names()
BIG_PRESETS = ["nemotron3-nano", "nemotron3-super"]
GPU_BYTES = 80e9  # an "80 GB" GPU, in decimal gigabytes (what the card is sold as; it holds a little more)
HEADROOM = 0.10  # kept free for the allocator's fragmentation, communication buffers and the CUDA context
# (preset, rows, tokens per row, micro-batches per step): activations a visible share, seconds per step
TRAIN_CHECKS = [("tiny", 4, 512, 2), ("small", 2, 512, 2)]
DASH = "—"
PLAN_TERMS = ["weights", "grads", "optimizer", "ddp_buckets", "weight_copies", "fsdp_gathered", "activations_kept",
              "activations", "logprobs", "rollout_cache", "total"]


def train_plan(setup: TrainSetup, presets: list[str] = TRAIN_PRESETS) -> list[dict]:
    """Every preset under DDP and FSDP, fp32 and bf16, with ``setup``'s devices, micro-batch, log-prob chunk
    and rollout cache; each row holds the terms of ``train_memory`` without and with checkpointing."""
    rows = []
    for preset in presets:
        for strategy in ("ddp", "fsdp"):
            for dtype in ("fp32", "bf16"):
                base = replace(setup, strategy=strategy, dtype=dtype, path="torch")
                plain = train_memory(preset, replace(base, checkpointing=False))
                ckpt = train_memory(preset, replace(base, checkpointing=True))
                rows.append({"preset": preset, "strategy": strategy, "dtype": dtype, "params": plain["params"],
                             **{k: plain[k] for k in PLAN_TERMS},
                             **{f"{k}_ckpt": ckpt[k] for k in ("weight_copies", "activations_kept", "activations",
                                                               "total")}})
    return rows


def gpus_needed(setup: TrainSetup, presets: list[str] = BIG_PRESETS, device_bytes: float = GPU_BYTES,
                headroom: float = HEADROOM) -> list[dict]:
    """The smallest FSDP device count per preset whose per-device total fits ``device_bytes`` less the
    headroom, with the per-device terms at that count."""
    rows = []
    for preset in presets:
        n = devices_needed(preset, setup, device_bytes, headroom)
        terms = train_memory(preset, replace(setup, devices=n)) if n else {}
        rows.append({"preset": preset, "devices": n, "reference_placement": setup.reference,
                     **{k: terms.get(k) for k in [*PLAN_TERMS, "reference"]}})
    return rows


def measure_step(preset: str, batch: int, seq_len: int, checkpointing: bool, micro_batches: int) -> dict:
    """Peak bytes of one training step of ``HybridLM(preset)`` (default implementation, fp32, this CPU):
    ``micro_batches`` forwards and backwards of a token-mean log-prob loss accumulated into the gradients,
    then an AdamW step, with the AdamW state already there (as in every step after the first).

    The peak is the CPU allocator's: every allocation and free of a tensor as torch's profiler records it
    (``profile_memory``), summed in time order from before the model is built. This torch has no CPU
    allocator statistics, and the resident set is no measure here: it counts library pages, which a busy
    machine evicts and reloads, and malloc's slack. Run it in a fresh process."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from hybrid_rl.model import HybridLM

    torch.manual_seed(0)
    cfg = HybridConfig.from_preset(preset)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = HybridLM(cfg).train().set_activation_checkpointing(checkpointing)
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=False)
        for p in params:  # one step on zero gradients creates the AdamW state
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ids = torch.randint(0, cfg.vocab_size, (micro_batches, batch, seq_len + 1))
        with record_function("train_step"):
            for ids_bt in ids:
                logits_btv = model(ids_bt[:, :-1]).logits
                logp_bt = torch.log_softmax(logits_btv, -1).gather(-1, ids_bt[:, 1:, None])[..., 0]
                del logits_btv
                (-logp_bt.mean() / micro_batches).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    events = prof.profiler.kineto_results.events()
    start = next(e.start_ns() for e in events if e.name() == "train_step")
    live = peak = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += e.nbytes()
        if e.start_ns() >= start:
            peak = max(peak, live)
    return {"peak_bytes": peak}


def check_train(cases=TRAIN_CHECKS) -> list[dict]:
    """``measure_step`` of each case, with and without checkpointing, each in a fresh subprocess, against
    ``train_memory`` of the same step (one device, fp32, the CPU kernels' path)."""
    rows = []
    for preset, batch, seq_len, micro_batches in cases:
        for checkpointing in (False, True):
            args = json.dumps([preset, batch, seq_len, checkpointing, micro_batches])
            code = ("import json, sys; from hybrid_rl.benchmarks.bench_memory import measure_step; "
                    "print(json.dumps(measure_step(*json.loads(sys.argv[1]))))")
            done = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"measuring {preset} failed:\n{done.stderr[-2000:]}")
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            setup = TrainSetup(strategy="ddp", devices=1, dtype="fp32", batch=batch, seq_len=seq_len,
                               checkpointing=checkpointing, path="kernels")
            formula = train_memory(preset, setup)
            rows.append({"preset": preset, "batch": batch, "seq_len": seq_len, "micro_batches": micro_batches,
                         "checkpointing": checkpointing, "formula_bytes": formula["total"],
                         "measured_bytes": measured["peak_bytes"],
                         "activations_bytes": formula["activations"],
                         "rel_error": formula["total"] / measured["peak_bytes"] - 1})
    return rows


def measure_train(setup: TrainSetup, check: bool = False, answer: TrainSetup | None = None) -> dict:
    answer = answer or TrainSetup(strategy="fsdp", dtype="bf16", batch=1, seq_len=8192, checkpointing=True,
                                  logprob_chunk_tokens=1024, rollout_batch=setup.rollout_batch,
                                  rollout_context=setup.rollout_context)
    result = {"benchmark": "memory_train", "setup": asdict(setup), "plan": train_plan(setup),
              "gpu_bytes": GPU_BYTES, "headroom": HEADROOM, "answer_setup": asdict(answer),
              "answer": gpus_needed(answer) + gpus_needed(replace(answer, reference="device")),
              "note": "AdamW, fp32 master weights and optimizer state, bf16 = autocast; see hybrid_rl.model.memory"}
    if check:
        result["check"] = check_train()
    return result


def _gib(n) -> str:
    return DASH if n is None else f"{n / 1024**3:.2f}"


def _plan_cells(row: dict) -> list:
    return [row["preset"], row["strategy"], row["dtype"], *(_gib(row[k]) for k in ("weights", "grads", "optimizer")),
            _gib(row["ddp_buckets"] + row["fsdp_gathered"]),
            f"{_gib(row['weight_copies'])} / {_gib(row['weight_copies_ckpt'])}",
            *(_gib(row[k]) for k in ("activations", "activations_ckpt", "logprobs", "rollout_cache", "total",
                                     "total_ckpt"))]


PLAN_HEAD = ["preset", "strategy", "dtype", "weights", "grads", "AdamW", "DDP buckets / FSDP unit",
             "bf16 copies (- / ckpt)", "act", "act (ckpt)", "log-probs", "rollout cache", "total", "total (ckpt)"]
CHECK_HEAD = ["preset", "micro-batches x rows x tokens", "checkpointing", "formula", "measured", "error"]
ANSWER_HEAD = ["preset", "80 GB GPUs", "weights", "grads", "AdamW", "KL reference", "gathered unit", "act (ckpt)",
               "log-probs", "rollout cache", "total per GPU"]


def _check_cells(row: dict) -> list:
    return [row["preset"], f"{row['micro_batches']} x {row['batch']} x {row['seq_len']}",
            "on" if row["checkpointing"] else "off", _mib(row["formula_bytes"]), _mib(row["measured_bytes"]),
            f"{100 * row['rel_error']:+.1f}%"]


def _mib(n) -> str:
    return f"{n / 1024**2:.1f} MiB"


def _answer_cells(row: dict) -> list:
    with_ref = row.get("reference_placement", "none") != "none"  # (results from before the reference term: none)
    return [row["preset"] + (", with a KL reference" if with_ref else ""),
            DASH if row["devices"] is None else str(row["devices"]),
            *(_gib(row[k]) for k in ("weights", "grads", "optimizer")), _gib(row["reference"]) if with_ref else DASH,
            *(_gib(row[k]) for k in ("fsdp_gathered", "activations", "logprobs", "rollout_cache", "total"))]


def _settings(setup: dict) -> str:
    chunk = setup["logprob_chunk_tokens"]
    return (f"micro-batch {setup['batch']} x {setup['seq_len']:,} tokens, log-probs "
            f"{'in chunks of ' + format(chunk, ',') + ' tokens' if chunk else 'over all tokens at once'}, "
            f"rollout cache {setup['rollout_batch']} x {setup['rollout_context']:,} tokens (fp32 like the pool's model: "
            f"the engine does not autocast)")


def train_table(result: dict) -> str:
    setup, ans = result["setup"], result["answer_setup"]
    lines = [f"training memory per device (GiB), {setup['devices']} devices, {_settings(setup)}",
             *aligned(PLAN_HEAD, [_plan_cells(r) for r in result["plan"]], left=3)]
    if result.get("check"):
        lines += ["", "formula vs measured peak of a training step on this CPU (fp32, one process)",
                  *aligned(CHECK_HEAD, [_check_cells(r) for r in result["check"]], left=3)]
    lines += ["", f"80 GB GPUs needed: FSDP bf16, checkpointing, {_settings(ans)}, "
                  f"{100 * result['headroom']:.0f}% headroom (GiB per GPU)",
              *aligned(ANSWER_HEAD, [_answer_cells(r) for r in result["answer"]], left=1)]
    return "\n".join(lines)


def _md_table(head: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(map(str, r)) + " |" for r in rows)]) + "\n"


def train_memory_markdown(result: dict) -> str:
    """The docs/BENCHMARKS.md section of ``bench memory --train``'s result: the per-preset plan, the check
    against measured peaks, and the number of 80 GB GPUs for the Nemotron 3 presets."""
    setup, ans = result["setup"], result["answer_setup"]
    out = ["## Memory: training per device\n",
           "Per-device bytes of one training step from `hybrid_rl.model.memory.train_memory`, computed from the "
           "config (nothing is allocated). AdamW with fp32 master weights and two fp32 moments; bf16 means "
           "autocast, so only activations shrink. DDP replicates the state and adds its gradient buckets and, in "
           "bf16, autocast's weight copies kept for the backward (*bf16 copies*: all layers', or one layer's "
           "with checkpointing); FSDP divides the state by the device count and adds one all-gathered unit with "
           "its unsharded gradient. Activations are what this implementation saves for the backward (held to "
           "`saved_tensors_hooks` per layer kind by the tests) plus one layer's backward workspace; checkpointing "
           "keeps each layer's fp32 input and recomputes one layer at a time. The log-prob pass holds three fp32 "
           "[tokens, V] buffers (one chunk's with chunked log-probs). Totals count the gradients alongside the "
           "activations (gradient accumulation) and a rollout engine's decode cache on the same device.\n",
           f"- **Settings:** {setup['devices']} devices, {_settings(setup)}; sizes in GiB.\n",
           _md_table(PLAN_HEAD, [_plan_cells(r) for r in result["plan"]])]
    if result.get("check"):
        worst = max(abs(r["rel_error"]) for r in result["check"])
        out += ["\n### The formula against measured peaks\n",
                "One training step on this CPU (fp32, the default implementation with its C kernels): the "
                "micro-batches' forwards and backwards of a token-mean log-prob loss accumulated into the "
                "gradients, then AdamW with its state already there; each case in a fresh process. *Measured* "
                "is the peak of the live tensor bytes as torch's profiler records the CPU allocator's "
                f"allocations and frees. Largest error: {100 * worst:.1f}%.\n",
                _md_table(CHECK_HEAD, [_check_cells(r) for r in result["check"]])]
    out += ["\n### How many 80 GB GPUs\n",
            f"FSDP, bf16, activation checkpointing, {_settings(ans)}; the smallest N whose per-GPU total fits in "
            f"80 GB (10^9 bytes) less {100 * result['headroom']:.0f}% headroom. GiB per GPU at that N. *With a KL "
            "reference*: RL with `algo.kl_beta > 0`, whose frozen reference is sharded like the policy and stored in "
            "bf16 (`Parallel.frozen_copy`).\n",
            _md_table(ANSWER_HEAD, [_answer_cells(r) for r in result["answer"]])]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybrid-rl bench memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, choices=HybridConfig.preset_names())
    parser.add_argument("--contexts", nargs="+", default=DEFAULT_CONTEXTS, help="e.g. 8K 128K 1M 4096")
    parser.add_argument("--batch", type=int, default=1, help="sequences held at once (--train: micro-batch rows)")
    parser.add_argument("--kv-dtype", default="bf16", choices=list(DTYPE_BYTES))
    parser.add_argument("--json-out", type=Path, help="also write the JSON here")
    train = parser.add_argument_group("training memory")
    train.add_argument("--train", action="store_true", help="per-device training memory instead of the decode cache")
    train.add_argument("--devices", type=int, default=8, help="devices N of the plan")
    train.add_argument("--seq-len", default="8K", help="tokens per micro-batch row, e.g. 8K or 4096")
    train.add_argument("--logprob-chunk", type=int, default=0,
                       help="log-probs in chunks of this many tokens (0: all at once)")
    train.add_argument("--rollout-batch", type=int, default=16, help="rows of the rollout engine's decode cache")
    train.add_argument("--rollout-context", default="8K", help="tokens per rollout row")
    train.add_argument("--check", action="store_true",
                       help="also measure real training steps of tiny and small on this CPU")
    args = parser.parse_args(argv)
    for c in [*args.contexts, args.seq_len, args.rollout_context]:
        try:
            parse_context(c)
        except ValueError as err:
            parser.error(str(err))
    if args.check and not args.train:
        parser.error("--check measures training memory; add --train")
    if args.train:
        try:
            setup = TrainSetup(devices=args.devices, batch=args.batch, seq_len=parse_context(args.seq_len),
                               logprob_chunk_tokens=args.logprob_chunk or None, rollout_batch=args.rollout_batch,
                               rollout_context=parse_context(args.rollout_context), checkpointing=False)
        except ValueError as err:
            parser.error(str(err))
        result = measure_train(setup, check=args.check)
        print(train_table(result))
    else:
        result = measure(args.presets, args.contexts, args.batch, args.kv_dtype)
        print(table(result))
    emit(result, args.json_out)  # one JSON line: what benchmarks.record reads
    return 0


if __name__ == "__main__":
    sys.exit(main())

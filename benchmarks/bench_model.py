"""Model speed against transformers' NemotronH, measured in one run on this machine.

Builds the canonical ``tiny`` model (docs/PEERS), copies the same weights into transformers'
``NemotronHForCausalLM``, and measures, interleaving the two so that load from other processes hits
both alike:

* training tokens/s: forward + backward + AdamW, batch 8 x 256 (fp32);
* cached decoding tokens/s: batch 64, 16-token prompt, 64 new tokens, greedy
  (ours: ``HybridLM.generate``; theirs: ``generate``);
* the fraction of this machine's fp32 matmul roofline each reaches (1024^2 matmul GFLOP/s measured in
  the same run; FLOP/token = 2 x active parameters, x3 for training);
* equivalence: max |logit difference| and the fraction of identical greedy tokens.

Prints one JSON line (and a short table on stderr).  ``--quick`` runs fewer, smaller repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from hybrid_rl.benchmarks.record import provenance
from hybrid_rl.model import HybridConfig, HybridLM
from hybrid_rl.model.hybrid import hf_state_dict


def hf_config(cfg: HybridConfig):
    from hybrid_rl.model.hf import transformers_config

    return transformers_config(cfg)


def active_params(cfg: HybridConfig, model: HybridLM) -> int:
    """Parameters touched per token: everything but the embedding table, experts at k/E."""
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp.") or name == "backbone.embeddings.weight":
            continue
        share = cfg.num_experts_per_tok / cfg.n_routed_experts if ".experts." in name else 1.0
        total += p.numel() * share
    return int(total)


def matmul_gflops(reps: int) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 1024**3 / min(times) / 1e9  # the machine's capability: its best, not a loaded moment


def train_step_fn(model, logits_of, ids):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        logits = logits_of(model, ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round by round (after one warm-up)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybrid-rl bench model", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and a shorter decode")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from transformers import NemotronHForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = HybridConfig.from_preset(args.preset)
    ours = HybridLM(cfg)
    theirs = NemotronHForCausalLM(hf_config(cfg))
    theirs.load_state_dict(hf_state_dict(ours), strict=True)
    flop_per_token = 2 * active_params(cfg, ours)
    gflops = matmul_gflops(10 if args.quick else 30)

    # equivalence on the benchmark model itself
    ids = torch.randint(0, cfg.vocab_size, (2, 100))
    with torch.no_grad():
        logit_diff = float((ours.eval()(ids).logits - theirs.eval()(input_ids=ids).logits).abs().max())

    # training: forward + backward + AdamW, batch 8 x 256
    batch, seq = 8, 256
    train_ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    ours.train()
    theirs.train()
    train = interleaved({
        "ours": train_step_fn(ours, lambda m, x: m(x).logits, train_ids),
        "transformers": train_step_fn(theirs, lambda m, x: m(input_ids=x).logits, train_ids),
    }, rounds=1 if args.quick else 5)
    ours.eval()
    theirs.eval()

    # cached decoding: batch 64, 16-token prompt, greedy
    dec_batch, prompt_len, new_tokens = 64, 16, (16 if args.quick else 64)
    prompt = torch.randint(0, cfg.vocab_size, (dec_batch, prompt_len))
    outputs = {}

    def ours_decode():
        outputs["ours"] = ours.generate(prompt, max_new_tokens=new_tokens)

    def hf_decode():
        with torch.no_grad():
            out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=cfg.pad_token_id)
        outputs["transformers"] = out[:, prompt_len:]

    decode = interleaved({"ours": ours_decode, "transformers": hf_decode}, rounds=1 if args.quick else 4)
    same = float((outputs["ours"] == outputs["transformers"]).float().mean())

    def side(train_s, decode_s):
        train_tps = batch * seq / train_s
        decode_tps = dec_batch * new_tokens / decode_s
        return {
            "train_tokens_per_s": round(train_tps, 1),
            "decode_tokens_per_s": round(decode_tps, 1),
            "train_roofline_fraction": round(train_tps * 3 * flop_per_token / (gflops * 1e9), 4),
            "decode_roofline_fraction": round(decode_tps * flop_per_token / (gflops * 1e9), 4),
        }

    gflops = max(gflops, matmul_gflops(10 if args.quick else 30))  # again after the runs: the better of two
    ours_fig = side(train["ours"], decode["ours"])
    hf_fig = side(train["transformers"], decode["transformers"])
    result = {
        "benchmark": "model",
        "preset": args.preset,
        "quick": args.quick,
        "threads": args.threads,
        **provenance(),
        "torch": torch.__version__,
        # other processes on the machine slow both sides alike; ratios stay comparable, absolutes do not
        "load_average_1min": round(os.getloadavg()[0], 2),
        "matmul_1024_gflops": round(gflops, 1),
        "mflop_per_token_forward": round(flop_per_token / 1e6, 2),
        "train_batch": [batch, seq],
        "decode": {"batch": dec_batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "greedy": True},
        "ours": ours_fig,
        "transformers": hf_fig,
        "train_speedup": round(ours_fig["train_tokens_per_s"] / hf_fig["train_tokens_per_s"], 2),
        "decode_speedup": round(ours_fig["decode_tokens_per_s"] / hf_fig["decode_tokens_per_s"], 2),
        "max_abs_logit_diff": logit_diff,
        "greedy_tokens_identical_fraction": round(same, 4),
    }
    print(f"train  tokens/s  ours {ours_fig['train_tokens_per_s']:>9}  transformers {hf_fig['train_tokens_per_s']:>9}"
          f"  x{result['train_speedup']}", file=sys.stderr)
    print(f"decode tokens/s  ours {ours_fig['decode_tokens_per_s']:>9}  transformers {hf_fig['decode_tokens_per_s']:>9}"
          f"  x{result['decode_speedup']}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

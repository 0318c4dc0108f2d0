"""Decode-cache memory of the hybrid models against a same-width model with attention in every layer.

    hybrid-rl bench memory [--presets nemotron3-nano nemotron3-super] [--contexts 8K 128K 1M]
                           [--batch 1] [--kv-dtype bf16] [--json-out PATH]

For each preset and context length: KV cache (bf16 by default), Mamba SSM state (fp32) and conv
window (model dtype), their total, and the total of the *all-attention twin*: the same hidden size,
query/KV heads, head_dim and layer count, with every layer an attention layer (pattern ``*`` x L).
Numbers come from ``model.cache_bytes`` (the analytic size of ``HybridCache``); nothing is allocated.

Context lengths: ``8K`` = 8,192 and ``128K`` = 131,072 tokens (powers of two, as context windows are
quoted), ``1M`` = 1,000,000 tokens (as the "1M-token context" claims are quoted); any integer works.
Prints a table and the result as one JSON line (``--json-out`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hybrid_rl.benchmarks.record import emit
from hybrid_rl.model.config import HybridConfig

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


def table(result: dict) -> str:
    head = ["preset", "context", "tokens", "KV", "SSM", "conv", "total", "all-attention", "ratio"]
    lines = [[r["preset"], r["context"], f"{r['tokens']:,}", fmt_bytes(r["kv_bytes"]), fmt_bytes(r["ssm_bytes"]),
              fmt_bytes(r["conv_bytes"]), fmt_bytes(r["total_bytes"]), fmt_bytes(r["all_attention_total_bytes"]),
              f"{r['ratio_all_attention_over_hybrid']:.1f}x"] for r in result["rows"]]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    render = lambda cells: "  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w)  # noqa: E731
                                     for i, (c, w) in enumerate(zip(cells, widths)))
    batch = result["rows"][0]["batch"] if result["rows"] else 1
    title = f"decode cache per {batch} sequence(s): KV {result['kv_dtype']}, SSM fp32, conv bf16"
    return "\n".join([title, render(head), render(["-" * w for w in widths]), *map(render, lines)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybrid-rl bench memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, choices=HybridConfig.preset_names())
    parser.add_argument("--contexts", nargs="+", default=DEFAULT_CONTEXTS, help="e.g. 8K 128K 1M 4096")
    parser.add_argument("--batch", type=int, default=1, help="sequences held at once")
    parser.add_argument("--kv-dtype", default="bf16", choices=list(DTYPE_BYTES))
    parser.add_argument("--json-out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    for c in args.contexts:
        try:
            parse_context(c)
        except ValueError as err:
            parser.error(str(err))
    result = measure(args.presets, args.contexts, args.batch, args.kv_dtype)
    print(table(result))
    emit(result, args.json_out)  # one JSON line: what benchmarks.record reads
    return 0


if __name__ == "__main__":
    sys.exit(main())

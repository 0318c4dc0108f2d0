"""``hybrid-rl convert``: read, rewrite and create NemotronH checkpoints.

    hybrid-rl convert SRC DST [--dtype bf16] [--max-shard-size 5GB] [--overwrite]
    hybrid-rl convert --init PRESET DST [key=value ...] [--seed 0] [--dtype bf16]
    hybrid-rl convert --info SRC

Our native checkpoint format *is* the HF NemotronH layout (see ``model/hf.py``), so ``SRC DST``
works both ways: a hub or transformers checkpoint becomes one that hybrid-rl trains from, and a
hybrid-rl checkpoint is already one that ``transformers.AutoModelForCausalLM`` loads. What the copy
does: checks every tensor against config.json (names and shapes), casts (``--dtype``), reshards
(``--max-shard-size``), rewrites legacy config spellings (``hybrid_override_pattern``, ``mamba_*``) and
``model.``-prefixed keys in the current form, and copies the tokenizer files and generation_config.json. The whole model is
loaded into CPU memory once (a 30B checkpoint in bf16 needs ~63 GB).

``--init`` writes a freshly initialised model of a preset (with overrides such as
``hidden_size=64``) and the byte tokenizer: the starting point of a from-scratch run or a test.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# files that travel with a checkpoint unchanged: the tokenizer (transformers' names) and generation defaults
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")


class UsageError(Exception):
    """A bad combination of arguments; reported as ``hybrid-rl convert: error: ...`` with exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n")[1]
    parser.add_argument("src", nargs="?", help="checkpoint directory to read (HF NemotronH layout)")
    parser.add_argument("dst", nargs="?", help="directory to write (created atomically)")
    parser.add_argument("overrides", nargs="*", help="with --init: config overrides, e.g. hidden_size=64 vocab_size=512")
    parser.add_argument("--init", metavar="PRESET", help="write a fresh random model of this preset to DST "
                        "(the one positional path)")
    parser.add_argument("--info", action="store_true", help="print a checkpoint's config summary and exit")
    parser.add_argument("--dtype", choices=list(DTYPES), help="cast parameters (default: keep; fp32 for --init)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 2GB or 500MiB")
    parser.add_argument("--seed", type=int, default=0, help="with --init: the initialisation seed")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists (atomically)")


def run(args: argparse.Namespace) -> int:
    import sys

    from hybrid_rl.model.hf import CheckpointError

    try:
        return _run(args)
    except (CheckpointError, NotADirectoryError, UsageError) as err:
        print(f"hybrid-rl convert: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from hybrid_rl.model.hf import parse_size

    try:
        parse_size(args.max_shard_size)
    except ValueError as err:
        raise UsageError(f"--max-shard-size: {err}")
    if args.info:
        return _info(_one_path(args, "--info SRC"))
    if args.init:
        dst = _one_path(args, "--init PRESET DST")
        return _init(args.init, dst, args)
    if args.src is None or args.dst is None:
        raise UsageError("give SRC and DST, or --init PRESET DST, or --info SRC "
                         "(see hybrid-rl convert --help)")
    if args.overrides:
        raise UsageError(f"unexpected argument(s) {' '.join(args.overrides)}; "
                         "key=value overrides go with --init")
    return _convert(Path(args.src), Path(args.dst), args)


def _one_path(args: argparse.Namespace, usage: str) -> Path:
    """--init/--info take one path; argparse may have put overrides into ``dst``."""
    rest = [a for a in (args.dst, *args.overrides) if a is not None]
    if args.src is None:
        raise UsageError(f"usage: hybrid-rl convert {usage}")
    args.overrides = rest
    return Path(args.src)


def _check_dst(src: Path | None, dst: Path, overwrite: bool) -> None:
    if src is not None and src.resolve() == dst.resolve():
        raise FileExistsError(f"SRC and DST are the same directory ({dst}); write to a new directory")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it, or choose another DST")


def _convert(src: Path, dst: Path, args: argparse.Namespace) -> int:
    from hybrid_rl.model.hf import load_pretrained, save_pretrained

    _check_dst(src, dst, args.overwrite)
    model = load_pretrained(src, dtype=DTYPES.get(args.dtype))
    tokenizer = _CopiedFiles(src, COPIED_FILES)
    save_pretrained(model, dst, tokenizer=tokenizer if tokenizer.files else None,
                    max_shard_bytes=args.max_shard_size, overwrite=args.overwrite)
    print(f"wrote {dst}: {_summary(model)}" + (f"; copied {', '.join(tokenizer.files)}" if tokenizer.files else ""))
    return 0


def _init(preset: str, dst: Path, args: argparse.Namespace) -> int:
    from hybrid_rl.config import load_config
    from hybrid_rl.model import HybridLM
    from hybrid_rl.model.config import HybridConfig
    from hybrid_rl.model.hf import save_pretrained
    from hybrid_rl.model.tokenizer import ByteTokenizer

    _check_dst(None, dst, args.overwrite)
    cfg = load_config(HybridConfig, None, [f"preset={preset}", *args.overrides])
    tokenizer = ByteTokenizer()
    if cfg.vocab_size < tokenizer.vocab_size:
        raise UsageError(f"vocab_size={cfg.vocab_size} is smaller than the byte "
                         f"tokenizer's {tokenizer.vocab_size} ids; set vocab_size>={tokenizer.vocab_size}")
    torch.manual_seed(args.seed)
    model = HybridLM(cfg)
    save_pretrained(model, dst, tokenizer=tokenizer, max_shard_bytes=args.max_shard_size,
                    dtype=DTYPES.get(args.dtype), overwrite=args.overwrite)
    print(f"wrote {dst}: fresh {preset} (seed {args.seed}), {_summary(model)}")
    return 0


def _info(src: Path) -> int:
    import json

    from hybrid_rl.model.hf import read_config

    cfg = read_config(src)
    raw = json.loads((src / "config.json").read_text())
    print(f"{src}: {cfg.num_layers} layers {cfg.layer_pattern}")
    print(f"  hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, attention {cfg.num_attention_heads}q/"
          f"{cfg.num_key_value_heads}kv x {cfg.head_dim}, mamba {cfg.mamba_num_heads} x {cfg.mamba_head_dim} "
          f"state {cfg.ssm_state_size}, experts {cfg.n_routed_experts} top-{cfg.num_experts_per_tok}"
          + (f", latent {cfg.moe_latent_size}" if cfg.moe_latent_size else "")
          + (f", MTP {cfg.mtp_layer_pattern}" if cfg.num_mtp_layers else ""))
    print(f"  dtype {raw.get('dtype', raw.get('torch_dtype', '?'))}, "
          f"files {', '.join(sorted(p.name for p in src.iterdir() if p.is_file()))}")
    return 0


def _summary(model: torch.nn.Module) -> str:
    from hybrid_rl.model.hf import human_bytes

    n = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return f"{n / 1e6:.2f}M parameters, {dtype}, {human_bytes(size)}"


class _CopiedFiles:
    """Stands in for a tokenizer in ``save_pretrained``: copies the source's tokenizer files verbatim."""

    def __init__(self, src: Path, names: tuple[str, ...]):
        self.src = src
        self.files = [n for n in names if (src / n).is_file()]
        self.stop_ids = ()

    def save_pretrained(self, directory: str) -> None:
        for name in self.files:
            shutil.copy2(self.src / name, Path(directory) / name)

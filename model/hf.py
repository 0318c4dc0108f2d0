"""Read and write HF NemotronH checkpoints: ``config.json`` + safetensors, the hub's on-disk layout.

Our native checkpoint format *is* this layout, so a hybrid-rl checkpoint loads in
``transformers.AutoModelForCausalLM.from_pretrained`` and a hub / transformers checkpoint loads here.

On disk (what transformers' ``save_pretrained`` writes)::

    config.json                    model_type nemotron_h, architectures [NemotronHForCausalLM]
    generation_config.json
    model.safetensors              or model-0000i-of-0000N.safetensors + model.safetensors.index.json
    backbone.embeddings.weight, backbone.layers.{i}.…, backbone.norm_f.weight, lm_head.weight
    backbone.layers.{i}.mixer.experts.{j}.up_proj.weight [I, D_e]   (one key per expert)
    mtp.…                          the MTP block (transformers ignores these keys)

In memory ``HybridLM`` uses the same names and stacks experts: ``mixer.experts.up_proj [E, I, D_e]``.
The only renames are that stacking, and ``model.`` → ``backbone.`` for files written from a
transformers state dict by other tools.

Config mapping (``hf_config_to_hybrid`` / ``hybrid_to_hf_config``): field names are shared, except
the layer list (``layers_block_type`` names, or the older ``hybrid_override_pattern`` letters), the
legacy ``mamba_*`` spellings, ``layer_norm_epsilon`` (our ``rms_norm_eps``),
``num_nextn_predict_layers`` / ``mtp_layers_block_type`` (our ``num_mtp_layers`` / ``mtp_layer_pattern``),
and the dt clamp. A config's clamp is ``time_step_limit[0]`` (mamba_ssm's ``dt_limit``, which Megatron,
vLLM and transformers >= 5.25 apply in every path; ``time_step_min`` / ``time_step_max`` only set the dt
init): on import ``time_step_min_clamp = time_step_limit[0]``, 0 (no clamp) when absent, as transformers'
default ``[0, inf]``; an upper limit other than infinity is refused (our kernels clamp from below only).
transformers up to 5.24 clamped at ``time_step_min`` in its chunked torch path instead, so a checkpoint
trained with that path (a clamp at 0.001) reads here as unclamped: the two differ only where softplus
gives dt < 0.001. The legacy spelling ``mamba_dt_limit`` is read as ``time_step_limit``. On export
``time_step_limit = [clamp, inf]`` and, for a clamp > 0, ``time_step_min = clamp`` (so transformers <= 5.24
clamps there too). A clamp of 0 cannot be a ``time_step_min`` (transformers' dt init takes its log), so it is
written as the default 0.001 with ``hybrid_rl_time_step_min_clamp: 0.0`` beside it (read first, for
checkpoints this project wrote); transformers <= 5.24 would clamp such a model at 0.001.

Saving is atomic: files go to a temp dir beside the target, which is then renamed into place (an
existing target is swapped out and removed only after the rename), so a crash never leaves a half
checkpoint under the target name.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from hybrid_rl.checkpoint import CheckpointError  # defined in the foundation (the CLI catches it); raised here
from hybrid_rl.model.config import HF_BLOCK_NAMES, HybridConfig

__all__ = [
    "CheckpointError", "hf_config_to_hybrid", "hybrid_to_hf_config", "load_pretrained", "save_pretrained",
    "load_state_dict", "to_disk_state_dict", "from_disk_state_dict", "parse_size",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

LETTER_OF_BLOCK = {name: letter for letter, name in HF_BLOCK_NAMES.items()}
LETTER_OF_BLOCK.update({"mamba": "M", "attention": "*"})  # legacy names (transformers remaps them too)

# HF name -> our name, for fields spelled differently; legacy spellings first, current last
_RENAMES = {
    "mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_chunk_size": "chunk_size",
    "mamba_d_state": "ssm_state_size", "mamba_d_head": "mamba_head_dim", "mamba_n_heads": "mamba_num_heads",
    "layer_norm_epsilon": "rms_norm_eps", "num_nextn_predict_layers": "num_mtp_layers",
    "num_local_experts": "n_routed_experts",
}
# HF fields whose value we do not model: (value we require, why it matters). Others are ignored.
_HF_NAMES = {ours: theirs for theirs, ours in _RENAMES.items()}
_REQUIRED = {
    "attention_bias": (False, "attention projections have no bias"),
    "mlp_bias": (False, "MLP projections have no bias"),
    "use_bias": (False, "Mamba in/out projections have no bias"),
    "mamba_proj_bias": (False, "Mamba in/out projections have no bias"),
    "use_conv_bias": (True, "the Mamba causal conv has a bias"),
    "mamba_conv_bias": (True, "the Mamba causal conv has a bias"),  # its legacy spelling
    "mlp_hidden_act": ("relu2", "FFNs are squared ReLU"),
    "mamba_hidden_act": ("silu", "the Mamba conv activation is SiLU"),
    "n_group": (1, "routing has no expert groups"),
    "topk_group": (1, "routing has no expert groups"),
    "sliding_window": (None, "attention is global"),
}
# Fields transformers writes that carry no model meaning for us; written with transformers' defaults.
_HF_DEFAULTS: dict[str, Any] = {
    "attention_bias": False, "attention_dropout": 0.0, "expand": 2, "hidden_dropout": 0.0,
    "mamba_hidden_act": "silu", "mamba_proj_bias": False, "mamba_ssm_cache_dtype": "float32",
    "max_position_embeddings": 4096, "mlp_bias": False, "mlp_hidden_act": "relu2",
    "moe_shared_expert_overlap": True, "n_group": 1, "num_logits_to_keep": 1, "output_router_logits": False,
    "rescale_prenorm_residual": True, "residual_in_fp32": False, "sliding_window": None,
    "time_step_floor": 1e-4, "time_step_max": 0.1, "time_step_min": 0.001, "topk_group": 1,
    "use_bias": False, "use_cache": True, "use_conv_bias": True, "use_mamba_kernels": True,
}


# ---------------------------------------------------------------------- config


def _pattern(value: Any, key: str) -> str:
    """Letters from a ``*_block_type`` list (names) or a ``*_pattern`` string (letters)."""
    if isinstance(value, str):
        return value
    try:
        return "".join(LETTER_OF_BLOCK[name] for name in value)
    except KeyError as err:
        raise CheckpointError(
            f"config.json {key} has unknown layer type {err.args[0]!r}; "
            f"expected one of {sorted(set(LETTER_OF_BLOCK))}"
        ) from None
    except TypeError:
        raise CheckpointError(f"config.json {key} must be a list of layer type names, got {value!r}") from None


# keys a config.json may leave out, at transformers' NemotronHConfig defaults where ours differ (ours are sized for
# a laptop): a checkpoint without them means what it means to transformers
_HF_MISSING = {
    "vocab_size": 131072, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "intermediate_size": 21504, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 7688,
    "moe_shared_expert_intermediate_size": 7688, "moe_latent_size": None,
}


def _check_types(out: dict) -> None:
    """Each value of ``out`` of the type its ``HybridConfig`` field takes (a quoted number or flag is an error)."""
    for name, value in out.items():
        kind = str(HybridConfig.__dataclass_fields__[name].type)
        if kind in ("int", "int | None"):
            ok = (isinstance(value, int) and not isinstance(value, bool)) or (value is None and kind == "int | None")
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind == "bool":
            ok = isinstance(value, bool)
        else:
            continue
        if not ok:
            key, word = _HF_NAMES.get(name, name), {"int": "integer", "int | None": "integer or null",
                                                     "float": "number", "bool": "true or false"}[kind]
            raise CheckpointError(f"config.json: {key}={value!r} ({type(value).__name__}) must be a JSON {word}, e.g. "
                                  f'"{key}": {json.dumps(getattr(HybridConfig(), name))}')


def _json_float(value):
    """A float from config.json: a number, or transformers' spelling of a non-finite one ({"__float__": "Infinity"})."""
    if isinstance(value, dict) and set(value) == {"__float__"} and isinstance(value["__float__"], str):
        try:
            return float(value["__float__"])
        except ValueError:
            return value
    return value


def _dt_clamp(hf: dict) -> float:
    """The dt clamp of a config: ``hybrid_rl_time_step_min_clamp`` (ours), else ``time_step_limit[0]`` (0 when
    absent: transformers' default ``[0, inf]``). The upper limit must be infinite."""
    if "hybrid_rl_time_step_min_clamp" in hf:
        low, high, key = hf["hybrid_rl_time_step_min_clamp"], math.inf, "hybrid_rl_time_step_min_clamp"
    else:
        key = "mamba_dt_limit" if "mamba_dt_limit" in hf and "time_step_limit" not in hf else "time_step_limit"  # legacy
        limit = hf.get(key, [0.0, math.inf])
        if not isinstance(limit, (list, tuple)) or len(limit) != 2:
            raise CheckpointError(f"config.json: {key}={limit!r} must be a pair [low, high], e.g. "
                                  '"time_step_limit": [0.0, Infinity]')
        low, high = _json_float(limit[0]), _json_float(limit[1])
    if isinstance(low, bool) or not isinstance(low, (int, float)) or not 0 <= low < math.inf:
        raise CheckpointError(f"config.json: {key} lower bound {low!r} must be a number >= 0 (the smallest dt after the "
                              'softplus), e.g. "time_step_limit": [0.0, Infinity]')
    if high != math.inf:
        raise CheckpointError(f"config.json: {key} upper bound {high!r} is not supported: hybrid-rl's kernels "
                              "clamp dt from below only; a checkpoint trained with an upper dt limit is another model "
                              "(set it to Infinity only if the model was trained without one)")
    return float(low)


def hf_config_to_hybrid(hf: dict) -> HybridConfig:
    """A ``HybridConfig`` from a NemotronH ``config.json`` dict (current or legacy spellings)."""
    model_type = hf.get("model_type")
    if model_type != "nemotron_h":
        raise CheckpointError(
            f"config.json has model_type {model_type!r}, expected 'nemotron_h'; hybrid-rl reads NemotronH / "
            "Nemotron 3 checkpoints only (convert other models with their own tools first)"
        )
    fields = {f for f in HybridConfig.__dataclass_fields__}
    out: dict[str, Any] = {}
    for key, value in hf.items():
        name = _RENAMES.get(key, key)
        if name in fields and name not in ("layer_pattern", "mtp_layer_pattern", "preset"):
            out[name] = value
    out = {**_HF_MISSING, **out}
    if out.get("num_key_value_heads") is None:  # null: as many as the query heads (transformers' reading)
        out["num_key_value_heads"] = out["num_attention_heads"]
    for key, (want, why) in _REQUIRED.items():
        if key in hf and hf[key] != want:
            raise CheckpointError(f"config.json {key}={hf[key]!r} is not supported: hybrid-rl needs {want!r} ({why})")
    if "layers_block_type" in hf or "layer_types" in hf:
        key = "layers_block_type" if "layers_block_type" in hf else "layer_types"
        out["layer_pattern"] = _pattern(hf[key], key)
    elif "hybrid_override_pattern" in hf:
        out["layer_pattern"] = _pattern(hf["hybrid_override_pattern"], "hybrid_override_pattern")
    else:
        raise CheckpointError("config.json has neither layers_block_type nor hybrid_override_pattern: no layer list")
    for key in ("mtp_layers_block_type", "mtp_hybrid_override_pattern"):
        if hf.get(key):
            out["mtp_layer_pattern"] = _pattern(hf[key], key)
            break
    out["time_step_min_clamp"] = _dt_clamp(hf)
    if isinstance(out.get("eos_token_id"), list):  # several stop ids: the first is the model's own
        out["eos_token_id"] = out["eos_token_id"][0] if out["eos_token_id"] else None
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # may be null in hub configs
        if out.get(key) is None:
            out.pop(key, None)
    _check_types(out)
    out["preset"] = hf.get("hybrid_rl_preset", "")
    try:
        return HybridConfig(**out)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"config.json describes an invalid model: {err}") from None


def hybrid_to_hf_config(cfg: HybridConfig, dtype: torch.dtype | None = None) -> dict:
    """The ``config.json`` dict transformers writes for the same model (keys sorted like its output)."""
    out: dict[str, Any] = dict(_HF_DEFAULTS)
    shared = [
        "vocab_size", "hidden_size", "tie_word_embeddings", "initializer_range", "num_attention_heads",
        "num_key_value_heads", "head_dim", "intermediate_size", "mamba_num_heads", "mamba_head_dim",
        "ssm_state_size", "n_groups", "conv_kernel", "chunk_size", "n_routed_experts", "num_experts_per_tok",
        "moe_intermediate_size", "moe_shared_expert_intermediate_size", "n_shared_experts", "moe_latent_size",
        "routed_scaling_factor", "norm_topk_prob", "pad_token_id", "bos_token_id", "eos_token_id",
    ]
    out.update({name: getattr(cfg, name) for name in shared})
    out["routed_scaling_factor"] = float(cfg.routed_scaling_factor)
    out["layers_block_type"] = [HF_BLOCK_NAMES[c] for c in cfg.layer_pattern]
    out["mtp_layers_block_type"] = [HF_BLOCK_NAMES[c] for c in cfg.mtp_layer_pattern]
    out["num_nextn_predict_layers"] = cfg.num_mtp_layers
    out["layer_norm_epsilon"] = cfg.rms_norm_eps
    clamp = float(cfg.time_step_min_clamp)
    out["time_step_limit"] = [clamp, {"__float__": "Infinity"}]
    if clamp > 0:
        out["time_step_min"] = clamp
    else:
        out["hybrid_rl_time_step_min_clamp"] = clamp
    out["architectures"] = ["NemotronHForCausalLM"]
    out["model_type"] = "nemotron_h"
    out["dtype"] = str(dtype or torch.float32).removeprefix("torch.")
    out["transformers_version"] = _transformers_version()
    if cfg.preset:
        out["hybrid_rl_preset"] = cfg.preset
    return dict(sorted(out.items()))


def transformers_config(cfg: HybridConfig):
    """The same config as a live ``transformers`` NemotronHConfig (for building its model beside ours)."""
    import transformers

    fields = {k: v for k, v in hybrid_to_hf_config(cfg).items() if k not in ("time_step_limit", "transformers_version")}
    # the clamp as a tuple (the dict is how config.json spells infinity): transformers >= 5.25 clamps dt there
    return transformers.AutoConfig.for_model(**fields, time_step_limit=(float(cfg.time_step_min_clamp), math.inf))


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        return "5.25.0"


def read_config(directory: str | os.PathLike) -> HybridConfig:
    directory = _check_dir(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_NAME}; point at a NemotronH checkpoint directory (config.json + "
            "*.safetensors), or write a fresh one with `hybrid-rl convert --init PRESET DIR`"
        )
    try:
        return hf_config_to_hybrid(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


def _check_dir(directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(
            f"{directory} is a file, not a checkpoint directory; pass the directory that holds config.json"
        )
    return directory


# ---------------------------------------------------------------------- state dict layout

_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^(.*\.experts)\.(up_proj|down_proj)$")


def to_disk_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory names -> on-disk names: stacked experts ``[E, out, in]`` become one key per expert."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        m = _STACKED.match(name)
        if m and tensor.dim() == 3:
            for j in range(tensor.shape[0]):
                out[f"{m.group(1)}.{j}.{m.group(2)}.weight"] = tensor[j]
        else:
            out[name] = tensor
    return out


def from_disk_state_dict(disk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On-disk names -> in-memory names (``model.`` prefix accepted as ``backbone.``; experts stacked)."""
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in disk.items():
        if name.startswith("model."):
            name = "backbone." + name[len("model."):]
        m = _PER_EXPERT.match(name)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = tensor
        else:
            out[name] = tensor
    for (prefix, proj), by_index in experts.items():
        n = max(by_index) + 1
        missing = [j for j in range(n) if j not in by_index]
        if missing:
            raise CheckpointError(f"{prefix}.{missing[0]}.{proj}.weight is missing (experts 0..{n - 1} expected)")
        shapes = {tuple(t.shape) for t in by_index.values()}
        if len(shapes) > 1:
            raise CheckpointError(f"{prefix}.*.{proj}.weight experts have different shapes {sorted(shapes)}")
        out[f"{prefix}.{proj}"] = torch.stack([by_index[j] for j in range(n)])
    return out


# ---------------------------------------------------------------------- load


def _load_safetensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    """One safetensors file; a truncated or corrupt one is a ``CheckpointError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); the checkpoint is truncated or "
                              "corrupt: copy it again or re-save it") from None


def load_state_dict(directory: str | os.PathLike, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir (single file or sharded), with on-disk names."""
    directory = _check_dir(directory)
    index = directory / INDEX_NAME
    device = str(device) if device is not None else "cpu"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{index} is not a safetensors index ({type(err).__name__}: {err}); it must be JSON "
                                  "with a 'weight_map' of tensor name -> shard file (re-save the checkpoint)") from None
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            path = directory / shard
            if not path.is_file():
                raise CheckpointError(f"{INDEX_NAME} lists shard {shard}, which is missing from {directory}")
            out.update(_load_safetensors(path, device))
        listed_only = sorted(set(weight_map) - set(out))
        if listed_only:
            raise CheckpointError(f"{INDEX_NAME} maps {listed_only[0]} to a shard that does not hold it")
        return out
    single = directory / WEIGHTS_NAME
    if single.is_file():
        return _load_safetensors(single, device)
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    hint = f" (found {', '.join(found)} but no {INDEX_NAME})" if found else ""
    pt = " .bin/.pt weights are not read: re-save them as safetensors." if list(directory.glob("*.bin")) else ""
    raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME} and no {INDEX_NAME}{hint}.{pt}")


def check_state_dict(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], tied: bool = False) -> None:
    """Raise a ``CheckpointError`` naming the first missing, extra or mis-shaped tensor (in-memory names)."""
    missing = [k for k in expected if k not in got and not (tied and k == "lm_head.weight")]
    extra = [k for k in got if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), first {missing[0]} {list(expected[missing[0]].shape)}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s), first {extra[0]} {list(got[extra[0]].shape)}")
    for k, t in got.items():
        if k in expected and tuple(t.shape) != tuple(expected[k].shape):
            problems.append(f"{k} has shape {list(t.shape)}, expected {list(expected[k].shape)}")
            break
    if problems:
        raise CheckpointError(
            "checkpoint weights do not match config.json: " + "; ".join(problems)
            + ". Check that config.json belongs to these weights (layer pattern, sizes)."
        )


def load_pretrained(directory: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None):
    """A ``HybridLM`` from a NemotronH checkpoint directory (ours, transformers' or the hub's).

    ``dtype`` None keeps the float dtype stored on disk (the most common one for the parameters; a router weight stored in
    fp32 beside bf16 weights, as transformers keeps it, stays fp32). The model is built on the meta device and
    the loaded tensors are assigned, so a checkpoint takes its own size in memory once.
    """
    from hybrid_rl.model import HybridLM

    directory = _check_dir(directory)
    cfg = read_config(directory)
    state = from_disk_state_dict(load_state_dict(directory, device))
    cfg = _as_the_weights_say(cfg, state, directory)
    with torch.device("meta"):
        model = HybridLM(cfg)
    expected = model.state_dict()
    check_state_dict(expected, state, tied=cfg.tie_word_embeddings)
    want = dtype or _main_float_dtype(state)
    params = {name for name, _ in model.named_parameters()}
    for name, tensor in state.items():  # parameters take the dtype asked for; buffers keep the model's own
        target = want if name in params else expected[name].dtype
        if dtype is None and name.endswith("mixer.gate.weight") and tensor.dtype == torch.float32:
            target = torch.float32  # the router, kept in fp32 by transformers beside bf16 weights (route() casts)
        if tensor.is_floating_point() and tensor.dtype != target:
            state[name] = tensor.to(target)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    _zero_leftover_buffers(model, device)
    return model.eval()


def _as_the_weights_say(cfg, state: dict[str, torch.Tensor], directory: Path):
    """``cfg`` adjusted where transformers writes a config.json its own weights do not follow (warned):
    ``tie_word_embeddings`` with an ``lm_head.weight`` of its own that differs from the embeddings (NemotronH in
    transformers never ties them: tying would throw that head away), and ``num_nextn_predict_layers`` with no
    ``mtp.*`` weights (transformers drops the MTP block when it loads, and saves without it)."""
    warn = logging.getLogger("hybrid_rl.model").warning
    head, emb = state.get("lm_head.weight"), state.get("backbone.embeddings.weight")
    if cfg.tie_word_embeddings and head is not None and emb is not None and not torch.equal(head, emb):
        warn("%s: config.json ties the embeddings and the output head, but the weights hold a head of their own; "
             "it is loaded untied (as transformers does)", directory)
        cfg = cfg.replace(tie_word_embeddings=False)
    if not cfg.n_shared_experts and any(".shared_experts." in k for k in state):
        warn("%s: config.json says n_shared_experts=0, but the weights hold shared experts (transformers builds one "
             "whatever the field says); loaded with them", directory)
        cfg = cfg.replace(n_shared_experts=1)
    if cfg.num_mtp_layers and not any(k.startswith("mtp.") for k in state):
        warn("%s: config.json has %d MTP layer(s) but the weights hold none (transformers saves without them); "
             "loaded without the MTP block", directory, cfg.num_mtp_layers)
        cfg = cfg.replace(num_mtp_layers=0)
    return cfg


def _main_float_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most elements (small fp32 buffers beside bf16 weights don't count)."""
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _zero_leftover_buffers(model: torch.nn.Module, device) -> None:
    """Non-persistent buffers (running statistics such as MoE expert load) are not in the file: start at 0."""
    for module_name, module in model.named_modules():
        for leaf, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[leaf] = torch.zeros(buf.shape, dtype=buf.dtype, device=device or "cpu")
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:  # check_state_dict guarantees this cannot happen; say so loudly if it does
        raise CheckpointError(f"parameter {still_meta[0]} was not loaded from the checkpoint")


# ---------------------------------------------------------------------- save


def parse_size(text: str | int) -> int:
    """'2GB' -> 2*10**9, '500MiB' -> 500*2**20, 1000 -> 1000 (bytes)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {text!r}; write e.g. 2GB, 500MB, 512MiB or a number of bytes")
    number, unit = float(m.group(1)), m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(number * base**power)


def _shards(disk: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy in sorted key order; a tensor bigger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(disk):
        nbytes = disk[name].numel() * disk[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = disk[name]
        size += nbytes
    return shards


def save_pretrained(model, directory: str | os.PathLike, tokenizer=None, max_shard_bytes: int | str = "5GB",
                    dtype: torch.dtype | None = None, overwrite: bool = True) -> Path:
    """Write ``model`` as a NemotronH checkpoint at ``directory``, atomically.

    ``tokenizer`` (a ``ByteTokenizer`` or ``HFChatTokenizer``) is saved beside the weights.
    ``dtype`` casts floating parameters (default: as they are); buffers keep their own dtype. ``overwrite=False`` refuses an existing
    ``directory``; otherwise it is replaced whole, never partially.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; remove it, pick another path, or pass overwrite=True")
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is a file; checkpoints are directories")
    cfg: HybridConfig = model.config
    if "E" in cfg.layer_pattern and not cfg.n_shared_experts:
        logging.getLogger("hybrid_rl.model").warning(
            "save_pretrained: n_shared_experts=0 loads back here, but transformers' NemotronH always builds a shared "
            "expert and would load it as missing (random) weights: this checkpoint is not faithful in transformers")
    state = _state_for_save(model, cfg, dtype)
    disk = to_disk_state_dict(state)
    float_dtype = _main_float_dtype(disk)

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shards = _shards(disk, parse_size(max_shard_bytes))
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            index = {
                "metadata": {"total_parameters": sum(t.numel() for t in disk.values()),
                             "total_size": sum(t.numel() * t.element_size() for t in disk.values())},
                "weight_map": dict(sorted(weight_map.items())),
            }
            _write_json(tmp / INDEX_NAME, index)
        _write_json(tmp / CONFIG_NAME, hybrid_to_hf_config(cfg, float_dtype))
        _write_json(tmp / "generation_config.json", _generation_config(cfg, tokenizer))
        if tokenizer is not None:
            (tokenizer.hf if hasattr(tokenizer, "hf") else tokenizer).save_pretrained(str(tmp))
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _state_for_save(model, cfg: HybridConfig, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state = {}
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        # buffers (the fp32 router correction bias) keep their dtype, as in the hub checkpoints
        if dtype is not None and t.is_floating_point() and name in params:
            t = t.to(dtype)
        state[name] = t.to("cpu").contiguous()
    if cfg.tie_word_embeddings and "lm_head.weight" in state:
        # written out, as its own copy (safetensors refuses shared storage): transformers' NemotronHForCausalLM
        # does not tie the head back from the embeddings, and would load it as a missing (random) tensor
        state["lm_head.weight"] = state["lm_head.weight"].clone()
    return state


def _generation_config(cfg: HybridConfig, tokenizer) -> dict:
    stop = list(getattr(tokenizer, "stop_ids", ()) or [cfg.eos_token_id])
    return {
        "_from_model_config": True, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": stop[0] if len(stop) == 1 else stop,
        "output_attentions": False, "output_hidden_states": False, "pad_token_id": cfg.pad_token_id,
        "transformers_version": _transformers_version(), "use_cache": True,
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def _replace_dir(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def human_bytes(n: float) -> str:
    if n <= 0:
        return "0 B"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    k = min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024**k:.1f} {units[k]}"

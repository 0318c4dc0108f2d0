"""Typed, validated configs: YAML recipes + dotted ``key=value`` overrides -> nested dataclasses.

Every component owns a dataclass (``hybrid_rl.model.config.HybridConfig``, ``hybrid_rl.sft.config.SFTTrainConfig``,
...); a stage's config (``SFTStageConfig``, ``RLStageConfig``, ...) is a dataclass whose fields are those
sections. This module turns a YAML file and command-line overrides into an instance, and fails *before
any work starts* when:

- a key is unknown  -> names the full dotted key and the closest valid keys (``model.hiden_size``
  suggests ``model.hidden_size``);
- a value has the wrong type -> names the key, the value and the expected type;
- the file is missing -> names the path.

Presets: a dataclass may define ``preset_defaults(name) -> dict`` (a classmethod) and a ``preset``
field; a section that names ``preset: tiny`` starts from that preset's values and its other keys
override them. The resolved config (preset values written out) round-trips through ``save_config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from hybrid_rl.registry import UnknownNameError, check_name
__all__ = ["ConfigError", "load_config", "from_dict", "to_dict", "save_config", "apply_overrides", "valid_keys"]


class ConfigError(ValueError):
    """A user-facing config problem; the message says what was given, what was expected and the fix."""


# ----------------------------------------------------------------------------------------- reading


def load_config(cls: type, path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Any:
    """Build ``cls`` from an optional YAML file plus ``key=value`` overrides (applied in order)."""
    data: dict = {}
    if path is not None:
        data = read_yaml(path, keep_text=True)
    data = apply_overrides(data, overrides, keep_text=True)
    return from_dict(cls, data)


def read_yaml(path: str | Path, keep_text: bool = False) -> dict:
    """The YAML file's top mapping. With ``keep_text`` every number, bool or date in it keeps the text it was
    written as (``_Scalar``), for ``from_dict`` to give to a str field: ``name: 007`` is the name "007"."""
    path = Path(path)
    if not path.is_file():
        hint = f" (the folder {path.parent} holds: {', '.join(sorted(p.name for p in path.parent.glob('*.yaml'))) or 'no .yaml files'})" if path.parent.is_dir() else ""
        raise ConfigError(f"config file not found: {path}{hint}. Pass the path of an existing YAML recipe, e.g. configs/sft_quick.yaml.")
    try:
        data = _load_yaml(path.read_text(), keep_text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values at the top, got {type(data).__name__}.")
    return data


def apply_overrides(data: dict, overrides: typing.Iterable[str], keep_text: bool = False) -> dict:
    """Apply ``a.b.c=value`` strings to a nested dict (values parsed as YAML: 3, 0.5, true, [1, 2], abc).

    A numeric path part indexes into a list (``envs.0.weight=2``). With ``keep_text`` (``load_config``) a
    number, bool or date keeps the text it was written as, for ``from_dict`` to give to a str field.
    """
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.hidden_size=64).")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key part; write dotted keys like train.lr=1e-3.")
        try:  # a str field keeps the text as written (keep_text): run.name=007 is "007", tags=[007] ["007"]
            value = _load_yaml(raw, keep_text) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node: Any = data
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[_list_index(node, part, key)]
                continue
            part = _existing_key(node, part)
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {key}: {part!r} holds a plain value, not a section; cannot set a key inside it.")
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, key)] = value
        else:
            node[_existing_key(node, last)] = value
    return data


def _existing_key(node: dict, part: str):
    """The key of ``node`` an override's ``part`` names: a file's ``007:`` key (a ``_Scalar``) by its text."""
    return next((k for k in node if isinstance(k, _Scalar) and k.text == part), part)


@dataclasses.dataclass(frozen=True)
class _Scalar:
    """A number, bool or date given as ``key=value``, with the text it was written as: YAML reads ``007``
    as 7 and ``1.10`` as 1.1, and a str field (a run name, a path) takes the text instead."""

    value: Any
    text: str

    def __repr__(self) -> str:
        return repr(self.value)


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key written twice in one mapping (plain YAML keeps the last one and
    drops the first in silence: two ``train:`` sections of a recipe would lose the first one's settings).

    Each mapping is checked once, as written: when it is first flattened (before a ``<<`` merge puts the
    merged mapping's keys into it, which a key of its own may override). Keys of different types are
    different keys (``1:`` and ``"1":``)."""

    def flatten_mapping(self, node):
        checked = self.__dict__.setdefault("_checked_mappings", set())
        if id(node) not in checked:
            checked.add(id(node))
            _refuse_repeated_keys(node)
        super().flatten_mapping(node)


def _refuse_repeated_keys(node) -> None:
    seen: dict[tuple[str, str], int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        line, key = key_node.start_mark.line + 1, (key_node.tag, key_node.value)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key_node.value!r} appears twice in one mapping (lines {seen[key]} "
                f"and {line}); YAML would keep only the second: write its settings under one key",
                key_node.start_mark)
        seen[key] = line


class _TextLoader(_StrictLoader):
    """The strict loader whose numbers, bools and dates (values and mapping keys) are ``_Scalar``s that keep
    their text."""


def _keeping_text(tag: str):
    construct = yaml.SafeLoader.yaml_constructors[tag]

    def build(loader, node):
        return _Scalar(construct(loader, node), node.value)
    return build


for _tag in ("int", "float", "bool", "timestamp"):
    _TextLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _keeping_text(f"tag:yaml.org,2002:{_tag}"))


def _load_yaml(text: str, keep_text: bool):
    return yaml.load(text, Loader=_TextLoader if keep_text else _StrictLoader)  # noqa: S506 - SafeLoader subclasses


def _plain(obj):
    """``obj`` with every ``_Scalar`` in it (keys too) replaced by its value: what a field typed Any, or a
    plain dict, gets."""
    if isinstance(obj, _Scalar):
        return obj.value
    if isinstance(obj, dict):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):  # (tuples and sets: YAML's !!omap, !!pairs, !!set)
        return type(obj)(_plain(v) for v in obj)
    return obj


def _written(key) -> str:
    """How a mapping key was written, for an error: its text as written (a number, a bool) or quoted."""
    return key.text if isinstance(key, _Scalar) else repr(key)


def _key_text(key) -> str:
    """A mapping key of a ``dict[str, ...]`` field as written (``007: 2.0`` is the key "007")."""
    return key.text if isinstance(key, _Scalar) else str(key)


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key}: {part!r} is not a valid index into a list of {len(node)} items.")
    return int(part)


def _deepcopy(obj):
    if isinstance(obj, dict):
        return {k: _deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------- validation


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key that ``cls`` accepts (sections and leaves)."""
    keys = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        name = prefix + f.name
        keys.append(name)
        sub = _dataclass_in(_hints(cls)[f.name])
        if sub is not None:
            keys.extend(valid_keys(sub, name + "."))
    return keys


def from_dict(cls: type, data: Any, path: str = "", root: type | None = None) -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys and types recursively."""
    root = root or cls
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a section (mapping) for {cls.__name__}, got {data!r}.")
    data = dict(data)
    preset_hook = getattr(cls, "preset_defaults", None)
    if isinstance(data.get("preset"), _Scalar):  # a str field: preset: 1e3 is the name "1e3"
        data["preset"] = data["preset"].text
    if preset_hook is not None and data.get("preset"):
        try:
            base = preset_hook(data["preset"])
        except ValueError as err:  # an unknown preset: the message names the closest and the valid ones
            raise ConfigError(f"{path}preset: {err}") from None
        data = {**base, **data}
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        key = key.text if isinstance(key, _Scalar) else key
        full = f"{path}{key}"
        if key not in fields:
            while isinstance(value, dict) and len(value) == 1:  # name the whole dotted key the user wrote
                sub, value = next(iter(value.items()))
                full = f"{full}.{sub}"
            raise ConfigError(_unknown_key_message(full, root))
        kwargs[key] = _convert(value, hints[key], full, root)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{path or 'config'}: missing required key(s) {', '.join(path + m for m in missing)}.")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{path.rstrip('.') + ': ' if path else ''}{err}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path.rstrip('.') or cls.__name__}: {err}") from None


def _unknown_key_message(full: str, root: type) -> str:
    keys = valid_keys(root)
    close = difflib.get_close_matches(full, keys, n=3, cutoff=0.6)
    if not close:  # match the last part against every key's last part, then take the nearest keys at all
        leaf = full.rpartition(".")[2]
        close = [k for k in keys if k.rpartition(".")[2] in difflib.get_close_matches(leaf, [x.rpartition(".")[2] for x in keys], n=3)]
        close = close[:3] or difflib.get_close_matches(full, keys, n=3, cutoff=0.0)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown config key {full!r}.{hint} Run with --print-config to see every valid key."


def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _dataclass_in(tp) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    if _is_union(tp):
        for arg in get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _is_union(tp) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not get_args(tp):
        return tp.__name__
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str, root: type) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (int->float, list->tuple, dict->dataclass)."""
    if isinstance(value, _Scalar) and not _is_union(tp):  # (a union tries each of its types with both)
        value = value.text if tp is str else value.value
    if tp is Any:
        return _plain(value)
    origin, args = get_origin(tp), get_args(tp)
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, root)
            except ConfigError as err:
                errors.append(err)
        dc = [e for e in errors if "unknown config key" in str(e)]
        if dc:
            raise dc[0]
        shown = value.value if isinstance(value, _Scalar) else value
        raise ConfigError(f"{key}: got {shown!r} ({type(shown).__name__}), expected {_type_name(tp)}.")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".", root)
    if origin is Literal:
        try:
            check_name("choice", value, args)
        except UnknownNameError as err:
            raise ConfigError(f"{key}: {err}") from None
        return value
    if origin in (list, tuple):
        item_tp = args[0] if args else Any
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}), expected a list ({_type_name(tp)}), "
                              f"e.g. {key}={_list_example(item_tp, value)}.")
        out = [_convert(v, item_tp, f"{key}.{i}", root) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}), expected a mapping ({_type_name(tp)}).")
        vt = args[1] if len(args) == 2 else Any
        out, written = {}, {}
        for k, v in value.items():
            text = _key_text(k)
            if text in out:  # 1: and "1": (or true: and "true":) are two YAML keys but one name here
                raise ConfigError(f"{key}: the keys {written[text]} and {_written(k)} both name {text!r}; give it once")
            out[text], written[text] = _convert(v, vt, f"{key}.{text}", root), _written(k)
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; accept what float() accepts
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # nan passes every range check (nan <= 0 is False), inf most of them
                raise ConfigError(f"{key}: got {value!r}, expected a finite number (no nan or inf: every setting that "
                                  "can be switched off is switched off by 0 or a flag).")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(tp, type):
        value = _plain(value)
        if isinstance(value, tp):
            return value
    else:
        return _plain(value)
    raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}), expected {_type_name(tp)}.")


# ------------------------------------------------------------------------------------------ writing


def to_dict(cfg: Any) -> Any:
    """A plain nested dict/list/scalar view of a config dataclass (for YAML, wandb, TensorBoard)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dump_yaml(cfg))
    tmp.replace(path)
    return path


def _config_dir() -> Path:
    """The folder of the package ``hybrid_rl.configs`` (configs/ in the repository; shipped in the wheel)."""
    spec = importlib.util.find_spec("hybrid_rl.configs")  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("hybrid_rl.configs is not installed: run `pip install -e .` in the repository "
                          "(or install hybrid-rl) so that the hybrid_rl.* subpackages resolve")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


CONFIG_DIR = _config_dir()  # the recipes add_config_arguments defaults to


# ------------------------------------------------------------------ a stage command's config arguments


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    """``[config.yaml] [key=value ...] [--print-config]`` for a stage command."""
    default_note = f" (default: configs/{default_config})" if default_config else ""
    parser.add_argument("config", nargs="?", help=f"YAML recipe{default_note}")
    parser.add_argument("overrides", nargs="*", help="dotted overrides (see --print-config for the keys), e.g. run.seed=1 run.tags=[a,b]")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(default_config=default_config)


def _list_example(item_tp, given) -> str:
    """An override that would give a list of ``item_tp``: a list of mappings with the item's fields for a
    dataclass (``[{env_id: ..., episodes: ...}]``), else the value given inside brackets, or two of the type."""
    if dataclasses.is_dataclass(item_tp):
        return "[{" + ", ".join(f"{f.name}: ..." for f in dataclasses.fields(item_tp)) + "}]"
    if isinstance(given, (str, int, float)) and not isinstance(given, bool):
        return f"[{given}]"
    return {int: "[1,2]", float: "[0.5,1.0]", str: "[a,b]"}.get(item_tp, "[...]")


def resolve_config(cls: type, args: argparse.Namespace) -> Any | None:
    """Load ``cls`` from the command's config file and overrides; prints it and returns None with --print-config.
    A config with a ``run`` section also sets up logging from it (``run.log_level``, ``run.quiet``), as
    every stage command does first."""
    overrides = list(args.overrides or [])
    path = args.config
    if path is not None and "=" in path and not path.endswith((".yaml", ".yml")):
        overrides.insert(0, path)  # `hybrid-rl sft key=value` with no file
        path = None
    if path is None and args.default_config:
        path = CONFIG_DIR / args.default_config
    cfg = load_config(cls, path, overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return None
    if hasattr(cfg, "run"):
        from hybrid_rl.log import setup_logging

        setup_logging(cfg.run.log_level, cfg.run.quiet)
    return cfg

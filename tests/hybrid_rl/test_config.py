"""The config system: YAML + dotted overrides -> typed dataclasses, with errors that name the fix."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from hybrid_rl.config import ConfigError, apply_overrides, dump_yaml, load_config, save_config, to_dict, valid_keys
from hybrid_rl.run import RunConfig
from hybrid_rl.model.config import HybridConfig


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int | None = None


@dataclass
class Stage:
    run: RunConfig = field(default_factory=RunConfig)
    model: HybridConfig = field(default_factory=HybridConfig)
    optim: Optim = field(default_factory=Optim)
    env_ids: list[str] = field(default_factory=lambda: ["hybrid_rl/GuessNumber-v0"])
    weights: dict[str, float] = field(default_factory=dict)
    init_from: str | None = None


def test_defaults_without_file():
    cfg = load_config(Stage)
    assert cfg.optim.lr == 1e-3 and cfg.model.hidden_size == HybridConfig().hidden_size


def test_yaml_file_and_overrides_nested_and_lists(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  preset: micro\noptim:\n  lr: 3.0e-4\nenv_ids: [a, b]\n")
    cfg = load_config(Stage, path, ["optim.betas=[0.8, 0.9]", "model.hidden_size=64", "env_ids.1=c", "weights.a=2"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.model.preset == "micro" and cfg.model.hidden_size == 64
    assert cfg.model.layer_pattern == HybridConfig.from_preset("micro").layer_pattern  # rest from the preset
    assert cfg.env_ids == ["a", "c"]
    assert cfg.weights == {"a": 2.0}


def test_later_overrides_win_and_types_convert():
    cfg = load_config(Stage, None, ["optim.lr=1", "optim.lr=2e-3", "optim.warmup_steps=10", "run.tags=[x,y]"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 2e-3
    assert cfg.optim.warmup_steps == 10 and cfg.run.tags == ["x", "y"]
    assert load_config(Stage, None, ["optim.warmup_steps=null"]).optim.warmup_steps is None


def test_str_fields_keep_the_text_written_on_the_command_line():
    """YAML reads 007 as 7, 1.10 as 1.1, yes as True and 2026-12-03 as a date: a str field takes the text."""
    assert load_config(Stage, None, ["run.name=yes"]).run.name == "yes"
    cfg = load_config(Stage, None, ["run.name=007", "init_from=1.10", "run.group=2026-12-03",
                                    "weights.a=0x10", "optim.warmup_steps=007"])
    assert cfg.run.name == "007" and cfg.init_from == "1.10"
    assert cfg.run.group == "2026-12-03"
    assert cfg.weights == {"a": 16.0} and cfg.optim.warmup_steps == 7  # numeric fields read the number
    assert load_config(Stage, None, ["init_from=null"]).init_from is None
    with pytest.raises(ConfigError, match=r"optim.warmup_steps: got 1.5 \(float\), expected int"):
        load_config(Stage, None, ["optim.warmup_steps=1.5"])


def test_str_fields_keep_the_text_written_in_a_file_and_in_lists(tmp_path):
    """The same in a YAML file and in list items: name: 007 is "007", tags [007, 1.10] stay as written, while the
    numeric fields beside them read the numbers."""
    path = tmp_path / "r.yaml"
    path.write_text("run:\n  name: 007\n  group: 2026-12-03\n  tags: [007, 1.10, yes]\n  seed: 007\n"
                    "init_from: 1.10\noptim:\n  lr: 0.5\n  betas: [0.8, 0.9]\n  warmup_steps: 010\n"
                    "weights: {a: 0x10}\nenv_ids: [007]\nmodel:\n  preset: micro\n  hidden_size: 64\n")
    cfg = load_config(Stage, path, ["run.tags.1=02", "env_ids=[1.0, x]"])
    assert cfg.run.name == "007" and cfg.run.group == "2026-12-03" and cfg.init_from == "1.10"
    assert cfg.run.tags == ["007", "02", "yes"] and cfg.env_ids == ["1.0", "x"]
    assert cfg.run.seed == 7 and cfg.optim.warmup_steps == 8  # YAML 1.1 reads 010 as octal 8, as before
    assert cfg.optim.lr == 0.5 and cfg.optim.betas == [0.8, 0.9] and cfg.weights == {"a": 16.0}
    assert cfg.model.hidden_size == 64 and cfg.model.preset == "micro"
    assert load_config(Stage, None, ["run.tags=[007, 3]"]).run.tags == ["007", "3"]


@dataclass
class Loose:
    weights: dict[str, float] = field(default_factory=dict)
    kwargs: dict = field(default_factory=dict)
    anything: Any = None


def test_keys_keep_their_text_and_untyped_fields_get_plain_values(tmp_path):
    """dict[str, ...] keys as written (007: 2.0 is "007", in a file as on the command line); a plain dict or a
    field typed Any gets plain YAML values, also inside YAML's !!omap / !!set, and saves back as YAML."""
    path = tmp_path / "r.yaml"
    path.write_text("weights: {007: 2.0, 1.10: 1}\nkwargs: {n: 007, flag: yes, 3: [1.5, {k: 2}]}\n"
                    "anything: !!omap [{b: 007}]\n")
    cfg = load_config(Loose, path, ["weights.007=3", "weights.08=4"])
    assert cfg.weights == {"007": 3.0, "1.10": 1.0, "08": 4.0}
    assert cfg.kwargs == {"n": 7, "flag": True, 3: [1.5, {"k": 2}]} and cfg.anything == [("b", 7)]
    assert type(cfg.anything[0][1]) is int
    save_config(cfg, tmp_path / "saved.yaml")  # no wrapper left for the YAML dumper to choke on
    assert load_config(Loose, None, ["anything=!!set {1, 2}"]).anything == {1, 2}


@pytest.mark.parametrize(
    "override, must_name, must_suggest",
    [
        ("nonexistent.key=3", "nonexistent.key", "Did you mean"),
        ("model.hiden_size=64", "model.hiden_size", "model.hidden_size"),
        ("optim.lr_rate=1", "optim.lr_rate", "optim.lr"),
        ("run.sed=1", "run.sed", "run.seed"),
    ],
)
def test_unknown_keys_name_the_key_and_the_closest_valid_one(override, must_name, must_suggest):
    with pytest.raises(ConfigError) as err:
        load_config(Stage, None, [override])
    assert repr(must_name) in str(err.value) and must_suggest in str(err.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.hidden_size=abc", "expected int"),
        ("optim.lr=fast", "expected float"),
        ("optim.betas=0.9", "expected a list"),
        ("optim.schedule=cosin", "Did you mean 'cosine'"),
        ("run.quiet=3", "expected bool"),
        ("model.hidden_size=true", "expected int"),
    ],
)
def test_wrong_types_name_key_value_and_expected_type(override, expected):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        load_config(Stage, None, [override])
    msg = str(err.value)
    assert key in msg and expected in msg and value.lower() in msg.lower()


def test_a_list_given_as_one_value_gets_an_example_of_its_own_kind():
    """The example fits the list's items (it said ``=[1,2]`` for a list of env mappings)."""
    from hybrid_rl.sft.config import SFTStageConfig

    with pytest.raises(ConfigError, match=re.escape("e.g. optim.betas=[0.9].")):
        load_config(Stage, None, ["optim.betas=0.9"])
    with pytest.raises(ConfigError, match=re.escape("e.g. data.envs=[{env_id: ..., episodes: ...}].")):
        load_config(SFTStageConfig, None, ["data.envs=hybrid_rl/GuessNumber-v0"])


def test_cross_field_validation_names_the_section_and_field():
    with pytest.raises(ConfigError, match=r"model: .*layer_pattern 'MQ\*'.*'Q'"):
        load_config(Stage, None, ["model.layer_pattern=MQ*"])
    with pytest.raises(ConfigError, match=r"num_attention_heads \(6\).*num_key_value_heads \(4\)"):
        load_config(Stage, None, ["model.num_attention_heads=6", "model.num_key_value_heads=4"])
    with pytest.raises(ConfigError, match="unknown model preset 'tinyy'. Did you mean 'tiny'"):
        load_config(Stage, None, ["model.preset=tinyy"])


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(Stage, tmp_path / "nope.yaml")


def test_bad_yaml_and_bad_override_syntax(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Stage, bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Stage, None, ["model.hidden_size"])
    with pytest.raises(ConfigError, match="not a valid index"):
        load_config(Stage, None, ["env_ids=[a]", "env_ids.7=x"])


def test_unknown_key_in_yaml_file_is_an_error_too(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match="'optim.lrr'.*optim.lr"):
        load_config(Stage, path)


def test_round_trip_of_saved_config(tmp_path):
    cfg = load_config(Stage, None, ["model.preset=tiny", "model.moe_latent_size=null", "optim.betas=[0.5,0.6]", "init_from=ckpt"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(Stage, path)
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    assert "moe_latent_size: null" in dump_yaml(cfg)


def test_valid_keys_lists_sections_and_leaves():
    keys = valid_keys(Stage)
    assert "model.hidden_size" in keys and "optim" in keys and "run.seed" in keys


def test_apply_overrides_does_not_mutate_input():
    base = {"a": {"b": 1}}
    out = apply_overrides(base, ["a.b=2", "a.c.d=[1]"])
    assert base == {"a": {"b": 1}} and out == {"a": {"b": 2, "c": {"d": [1]}}}

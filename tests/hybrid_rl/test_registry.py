"""The one registry of named variants: registration order, lookup, and the error for a bad name."""

import pytest

from hybrid_rl.config import ConfigError, load_config
from hybrid_rl.registry import Registry, UnknownNameError, check_name


def make_registry() -> Registry:
    reg = Registry("greeting")

    @reg.register("hello")
    def hello(name):
        return f"hello {name}"

    @reg.register("goodbye")
    def goodbye(name):
        return f"goodbye {name}"

    return reg


def test_registered_functions_come_back_by_name_in_registration_order():
    reg = make_registry()
    assert reg.names() == ["hello", "goodbye"]
    assert reg.get("goodbye")("x") == "goodbye x"
    assert Registry("preset", {"a": {"n": 1}, "b": {"n": 2}}).get("b") == {"n": 2}


@pytest.mark.parametrize("bad, suggestion", [("helo", "'hello'"), ("Goodbye", "'goodbye'"), ("goodby", "'goodbye'")])
def test_an_unknown_name_says_what_was_given_the_closest_and_every_choice(bad, suggestion):
    with pytest.raises(UnknownNameError) as err:
        make_registry().get(bad)
    msg = str(err.value)
    assert msg.startswith(f"unknown greeting {bad!r}.")
    assert f"Did you mean {suggestion}?" in msg and msg.endswith("Valid: 'hello', 'goodbye'.")
    assert isinstance(err.value, ValueError)  # callers that expect a ValueError keep working


@pytest.mark.parametrize("bad", ["zzzzzz", "", None, 3, ["hello"]])
def test_a_name_with_no_close_match_or_of_the_wrong_type_fails_without_a_suggestion(bad):
    with pytest.raises(UnknownNameError) as err:
        make_registry().get(bad)
    assert "Did you mean" not in str(err.value) and repr(bad) in str(err.value)


def test_a_name_registered_twice_and_an_empty_registry():
    reg = make_registry()
    with pytest.raises(ValueError, match="greeting 'hello' is registered twice"):
        reg.register("hello")(lambda name: name)
    assert reg.get("hello")("x") == "hello x"  # the first registration stands
    with pytest.raises(UnknownNameError, match="Valid: none registered"):
        Registry("thing").get("x")


def test_check_name_serves_plain_tuples_of_choices():
    check_name("split", "val", ("train", "val", "eval"))
    with pytest.raises(UnknownNameError, match=r"unknown split 'vall'\. Did you mean 'val'\?"):
        check_name("split", "vall", ("train", "val", "eval"))


@pytest.mark.parametrize("override, error", [
    ("algo.advantage=rlo", "unknown advantage estimator 'rlo'. Did you mean 'rloo'"),
    ("algo.kl_estimator=kk3", "unknown KL estimator 'kk3'. Did you mean 'k3'"),
    ("algo.loss_agg=token_mean", "unknown loss aggregation 'token_mean'. Did you mean 'token-mean'"),
    ("algo.mode=asnyc", "algo.mode: unknown choice 'asnyc'. Did you mean 'async'"),
    ("model.preset=mikro", "model.preset: unknown model preset 'mikro'. Did you mean 'micro'"),
])
def test_config_choices_fail_through_the_registry_as_config_errors(override, error):
    from hybrid_rl.rl.config import RLStageConfig

    with pytest.raises(ConfigError) as err:
        load_config(RLStageConfig, None, [override])
    assert error in str(err.value)

"""Answer formats find the answer in a reply; verifiers compare it with the reference; a user's verifier by module:function."""

import sys
import types

import pytest

from hybrid_rl.envs.verifiers import ANSWER_FORMATS, VERIFIERS, make_verifier, normalize_math, to_number
from hybrid_rl.registry import UnknownNameError


@pytest.mark.parametrize(("name", "reply", "answer"), [
    ("answer_line", "12+5=17.\nAnswer: 17", "17"),
    ("answer_line", "answer: 3\nno wait. ANSWER:  4 ", "4"),  # the last one, any case
    ("answer_line", "the answer is 4", None),
    ("answer_line", "Answer:   ", None),
    ("boxed", "so \\boxed{\\frac{1}{2}} it is", "\\frac{1}{2}"),  # nested braces
    ("boxed", "\\boxed{1} then \\boxed{2}", "2"),
    ("boxed", "\\boxed{unclosed", None),
    ("hashes", "48/2=24\n24+48=72\n#### 72", "72"),
    ("hashes", "72", None),
    ("last_number", "3 apples, then 1,250.5 left", "1,250.5"),
    ("last_number", "no digits", None),
    ("full", "  42 \n", "42"),
    ("full", " \n", None),
])
def test_answer_formats_find_the_answer(name, reply, answer):
    assert ANSWER_FORMATS.get(name).extract(reply) == answer


@pytest.mark.parametrize("name", ANSWER_FORMATS.names())
def test_what_a_format_writes_it_reads_back(name):
    fmt = ANSWER_FORMATS.get(name)
    assert fmt.extract(fmt.write("34")) == "34"


def test_numbers_read_the_ways_people_write_them():
    assert [to_number(s) for s in ("1,234", "$5", "50%", "-3/4", "2.5e3", "7.")] == [1234, 5, 50, -0.75, 2500, 7]
    assert to_number("12 apples") is None and to_number("1/0") is None and to_number("9" * 100) is None


def test_math_normalisation():
    assert normalize_math(" $\\boxed{\\dfrac{3}{4}}$ ") == "3/4"
    assert normalize_math("x = 1,000.") == "1000"
    assert normalize_math("\\text{5 cm}") == "5cm"


@pytest.mark.parametrize(("verifier", "answer", "reference", "right"), [
    ("exact", " Paris ", "Paris", True),
    ("exact", "paris", "Paris", False),
    ("numeric", "1,000", "1000", True),
    ("numeric", "0.3333333", "1/3", True),  # within the default tolerance
    ("numeric", "0.33", "1/3", False),
    ("numeric", "ten", "10", False),
    ("math", "1/2", "0.5", True),
    ("math", "\\frac{1}{2}", "0.5", True),
    ("math", "\\boxed{x=3}", "3", True),
    ("math", "2x+1", "2x + 1", True),
    ("math", "2x+1", "1+2x", False),  # no symbolic equivalence (docstring)
    ("regex", "Paris, France", "Paris.*", True),
    ("regex", "Lyon", "Paris.*", False),
    ("regex", "x", "([", False),  # a broken pattern scores 0
])
def test_verifiers(verifier, answer, reference, right):
    assert make_verifier(verifier, 1e-6)(answer, reference) == float(right)


def test_tolerance_is_relative_or_absolute():
    assert make_verifier("numeric", 0.01)("99.5", "100") == 1.0
    assert make_verifier("numeric", 0.01)("0.005", "0") == 1.0
    assert make_verifier("numeric", 0.001)("99.5", "100") == 0.0


def test_unknown_verifier_suggests_the_closest():
    with pytest.raises(UnknownNameError, match="unknown verifier 'numerc'. Did you mean 'numeric'?"):
        make_verifier("numerc", 0.0)
    assert VERIFIERS.names() == ["exact", "numeric", "math", "regex"]


@pytest.fixture
def user_verifiers(monkeypatch):
    module = types.ModuleType("my_verifiers")
    module.half = lambda answer, reference: 0.5 if answer[0] == reference[0] else 0.0
    module.crash = lambda answer, reference: 1 / 0
    module.huge = lambda answer, reference: 7
    module.as_list = lambda completions, references: [1.0 for _ in completions]  # TRL's signature: lists
    module.nan = lambda answer, reference: float("nan")
    module.yes = lambda answer, reference: answer == reference
    monkeypatch.setitem(sys.modules, "my_verifiers", module)
    return module


def test_a_users_verifier_by_module_and_function(user_verifiers):
    assert make_verifier("my_verifiers:half", 0.0)("42", "40") == 0.5  # partial credit
    assert make_verifier("my_verifiers:huge", 0.0)("a", "b") == 1.0  # clipped to [0, 1]
    with pytest.warns(RuntimeWarning, match="verifier my_verifiers:crash raised ZeroDivisionError.*scores 0"):
        assert make_verifier("my_verifiers:crash", 0.0)("1", "1") == 0.0
    # what it returns is named, with the signature a verifier has (it was a float() TypeError, or a silent 0 for NaN)
    with pytest.warns(RuntimeWarning, match=r"my_verifiers:as_list returned list \[1.0, 1.0\], not a number.*fn\(answer: str, reference: str\)"):
        assert make_verifier("my_verifiers:as_list", 0.0)("42", "40") == 0.0
    with pytest.warns(RuntimeWarning, match="my_verifiers:nan returned nan; the answer scores 0"):
        assert make_verifier("my_verifiers:nan", 0.0)("1", "1") == 0.0
    assert make_verifier("my_verifiers:yes", 0.0)("1", "1") == 1.0  # a bool is a score
    with pytest.raises(ValueError, match="has no 'hlaf'. Did you mean my_verifiers:half"):
        make_verifier("my_verifiers:hlaf", 0.0)

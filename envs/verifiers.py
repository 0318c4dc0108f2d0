"""Checking a reply against a reference answer: where the answer sits in the reply (answer formats) and
how it is compared (verifiers), each a named entry of a ``Registry``.

Answer formats (``ANSWER_FORMATS``) find the answer in a reply and write one (for the expert):

  answer_line   the text after the last ``Answer:`` on its line   ``Answer: 42``
  boxed         the contents of the last ``\\boxed{...}``          ``\\boxed{42}``
  hashes        the text after the last ``####`` (GSM8K)           ``#### 42``
  last_number   the last number in the reply                      ``so 42``
  full          the whole reply, stripped                         ``42``

Verifiers (``VERIFIERS``) score an extracted answer against the reference, 1.0 (right) or 0.0:

  exact     the same text once surrounding spaces are stripped
  numeric   both read as numbers (``1,234``, ``$5``, ``50%``, ``3/4``) and agree within ``tolerance``
            (relative or absolute, whichever is looser)
  math      the same after normalising LaTeX-ish notation (spaces, ``$``, ``\\boxed{}``, ``\\frac{a}{b}``,
            ``\\text{}``, commas in numbers, a leading ``x =``), or numerically equal as above
            (``1/2`` == ``0.5`` == ``\\frac{1}{2}``)
  regex     the reference is a pattern that the whole answer must match
  module:function   your own ``function(answer, reference) -> bool | float`` (a float is partial credit
            in [0, 1]); an exception in it scores 0 with a warning, so a bug there never stops a run

Departures from peers (verifiers' parsers, math-verify): no symbolic equivalence (``2x+1`` vs ``1+2x``):
that needs sympy's parser, which evaluates its input with ``eval``, and model output must not reach it.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from hybrid_rl.envs.contract import one_number
from hybrid_rl.registry import Registry

__all__ = ["AnswerFormat", "ANSWER_FORMATS", "VERIFIERS", "make_verifier", "to_number", "normalize_math"]


@dataclass(frozen=True)
class AnswerFormat:
    extract: Callable[[str], str | None]  # the answer in a reply, or None when the reply has none
    write: Callable[[str], str]  # a reply that gives this answer
    hint: str  # what a reply should look like, for the system prompt and invalid replies


def _after_last(marker: re.Pattern) -> Callable[[str], str | None]:
    def extract(text: str) -> str | None:
        found = marker.findall(text)
        return (found[-1].strip() or None) if found else None
    return extract


def _boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i].strip() or None
    return None


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?"


def _last_number(text: str) -> str | None:
    found = re.findall(_NUMBER, text)
    return found[-1] if found else None


def _full(text: str) -> str | None:
    return text.strip() or None


ANSWER_FORMATS: Registry[AnswerFormat] = Registry("answer format", {
    "answer_line": AnswerFormat(_after_last(re.compile(r"answer\s*:[ \t]*(.*)", re.I)), "Answer: {}".format,
                                "end with 'Answer: <value>'"),
    "boxed": AnswerFormat(_boxed, "\\boxed{{{}}}".format, "put the final answer in \\boxed{}"),
    "hashes": AnswerFormat(_after_last(re.compile(r"####[ \t]*(.*)")), "#### {}".format, "end with '#### <value>'"),
    "last_number": AnswerFormat(_last_number, str, "end with the number"),
    "full": AnswerFormat(_full, str, "reply with the answer only"),
})


# ---------------------------------------------------------------------- reading numbers and math

_NUMERIC = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?(/[-+]?\d+(\.\d*)?)?$", re.I)
MAX_NUMBER_CHARS = 64  # longer digit runs are not answers (and Fraction of 10**6 digits is slow)


def to_number(text: str) -> Fraction | None:
    """``"1,234"``, ``"$5"``, ``"50%"``, ``"-3/4"``, ``"2.5e3"`` -> an exact ``Fraction``; None when not a number."""
    s = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", text.strip().rstrip("."))
    s = s.replace("$", "").replace("\\%", "").replace("%", "").replace(" ", "")
    if len(s) > MAX_NUMBER_CHARS or not _NUMERIC.match(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


_LATEX_NOISE = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "^\\circ", "^{\\circ}", "\\(", "\\)", "$")


def normalize_math(text: str) -> str:
    """A canonical spelling: no spaces or ``$``, ``\\boxed{x}`` -> ``x``, ``\\frac{a}{b}`` -> ``a/b``,
    ``\\text{cm}`` -> ``cm``, commas out of numbers, no leading ``x=``, no trailing ``.``, lower case."""
    s = _boxed(text) or text
    for noise in _LATEX_NOISE:
        s = s.replace(noise, "")
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\((-?[\d.]+)\)/\((-?[\d.]+)\)", r"\1/\2", s)
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", s)
    s = re.sub(r"^[a-z]=", "", s, flags=re.I)
    return s.rstrip(".").lower()


def _close(a: Fraction | None, b: Fraction | None, tolerance: float) -> bool:
    if a is None or b is None:
        return False
    return a == b or math.isclose(float(a), float(b), rel_tol=tolerance, abs_tol=tolerance)


# ---------------------------------------------------------------------- verifiers: (answer, reference, tolerance) -> score

VERIFIERS: Registry[Callable[[str, str, float], float]] = Registry("verifier")


@VERIFIERS.register("exact")
def exact(answer: str, reference: str, tolerance: float) -> float:
    return float(answer.strip() == reference.strip())


@VERIFIERS.register("numeric")
def numeric(answer: str, reference: str, tolerance: float) -> float:
    return float(_close(to_number(answer), to_number(reference), tolerance))


@VERIFIERS.register("math")
def math_equal(answer: str, reference: str, tolerance: float) -> float:
    a, b = normalize_math(answer), normalize_math(reference)
    return float(a == b or _close(to_number(a), to_number(b), tolerance))


@VERIFIERS.register("regex")
def regex(answer: str, reference: str, tolerance: float) -> float:
    try:
        return float(re.fullmatch(reference, answer.strip()) is not None)
    except re.error:
        return 0.0


def make_verifier(name: str, tolerance: float) -> Callable[[str, str], float]:
    """``(answer, reference) -> score in [0, 1]`` for a registered verifier or a ``module:function``."""
    if ":" not in name:
        verify = VERIFIERS.get(name)
        return lambda answer, reference: verify(answer, reference, tolerance)
    from hybrid_rl.envs.adapters.common import resolve_target

    return _guarded(resolve_target(name, "verifier"), name)


VERIFIER_SIGNATURE = ("a verifier is called as fn(answer: str, reference: str) -> float in [0, 1], one answer at a "
                      "time (a TRL reward function, which takes lists, needs a wrapper)")


def _guarded(function: Callable, name: str) -> Callable[[str, str], float]:
    def verify(answer: str, reference: str) -> float:
        try:
            value = function(answer, reference)
        except Exception as err:  # the user's code: a bug there scores 0 rather than ending the run
            warnings.warn(f"verifier {name} raised {type(err).__name__}: {err}; the answer scores 0 ({VERIFIER_SIGNATURE}).",
                          RuntimeWarning, stacklevel=2)
            return 0.0
        value = one_number(value)  # a numpy or torch number: its value
        if not isinstance(value, numbers.Real):  # (a bool is one: True scores 1)
            warnings.warn(f"verifier {name} returned {type(value).__name__} {value!r:.60}, not a number; the answer scores 0 "
                          f"({VERIFIER_SIGNATURE}).", RuntimeWarning, stacklevel=2)
            return 0.0
        score = float(value)
        if not math.isfinite(score):
            warnings.warn(f"verifier {name} returned {score}; the answer scores 0 ({VERIFIER_SIGNATURE}).",
                          RuntimeWarning, stacklevel=2)
            return 0.0
        return min(max(score, 0.0), 1.0)
    return verify


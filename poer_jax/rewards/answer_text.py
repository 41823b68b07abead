"""Answers as text: the normal form two answers are compared in, plain-text math as LaTeX, units, words.

Competition answer keys write many answers as plain text (``sqrt(3)``, ``2^(n-1)``, ``n(n+1)*2^(n-2)``),
as words (``Yes``, ``odd``), or with units (``10 cm``, ``30^\\circ``). math-verify reads LaTeX: in a
prediction ``sqrt(3)`` is the product s q r t (3) and ``2^(n-1)`` does not parse. This module supplies what
``poer_jax.rewards.answers`` needs around math-verify:

* :func:`normalize_answer`: the form in which a prediction that reproduces the gold is recognised as such:
  ``$`` and ``\\boxed{}`` / ``\\text{}`` (and ``\\mathrm``, ``\\textbf``, ``\\mbox``...) unwrapped,
  ``\\left`` / ``\\right`` dropped, ``\\dfrac`` / ``\\tfrac`` -> ``\\frac``, TeX spacing (``\\,``, ``\\!``,
  ``~``) and whitespace removed, ``^\\circ`` -> ``°``, ``\\%`` -> ``%``, a trailing period dropped, and words
  lower-cased;
* :func:`plain_to_latex`: plain-text math rewritten as the LaTeX it means (``sqrt(x)`` -> ``\\sqrt{x}``,
  ``a^(b)`` -> ``a^{b}``, ``2^10`` -> ``2^{10}``, ``pi`` -> ``\\pi``, ``infinity`` / ``inf`` / ``oo`` ->
  ``\\infty``, ``ln`` / ``log`` / ``sin``... -> ``\\ln``..., ``**`` -> ``^``, ``>=`` -> ``\\geq``), with TeX's
  one-token arguments made explicit (``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt3`` -> ``\\sqrt{3}``); LaTeX
  already there is left as it is;
* :func:`split_unit`: ``"10 cm"`` -> ``("10", "cm")`` for the units of :data:`UNITS` (aliases to one name:
  ``centimeters`` is ``cm``), so that a prediction in other units is wrong (math-verify drops units, so
  ``10 m`` and ``10 cm`` were both 10);
* :func:`is_word_answer`: a gold made of words (``Yes``, ``no solution``, ``Tuesday``) is compared as text
  only; read as math it is a product of one-letter symbols, and ``no`` equals ``on``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["MATH_WORDS", "UNITS", "is_word_answer", "normalize_answer", "plain_to_latex", "split_unit",
           "strip_boxes"]

# Commands whose argument is the text itself.
_UNWRAP = ("boxed", "fbox", "text", "textbf", "textit", "textrm", "textnormal", "textsf", "texttt", "mathrm",
           "mathbf", "mathit", "mathsf", "mathtt", "mbox", "hbox", "operatorname")
_UNWRAP_RE = re.compile(r"\\(?:" + "|".join(_UNWRAP) + r")\s*\{")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_DELIMITER_SIZE_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg)(?![A-Za-z])\s*")
_INVISIBLE_DELIMITER_RE = re.compile(r"\\(?:left|right)\s*\.")
_FRAC_VARIANT_RE = re.compile(r"\\[dtc]frac(?![A-Za-z])")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])|~")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![A-Za-z])|\\degree(?![A-Za-z])|°")
_COMMAND_SPACE_RE = re.compile(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])")
_WHITESPACE_RE = re.compile(r"\s+")
_CHOICE_RE = re.compile(r"\(([A-Za-z])\)")

# Whole answers that are math, though made of letters only.
MATH_WORDS = frozenset({"pi", "e", "i", "inf", "infty", "infinity", "oo", "sqrt", "ln", "log", "exp", "sin",
                        "cos", "tan", "cot", "sec", "csc"})
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'\- ]*[A-Za-z]")


def _matching(text: str, open_pos: int, opening: str, closing: str) -> int | None:
    """Index of the bracket closing the one at ``open_pos`` (escaped brackets skipped); None if unbalanced."""
    depth = 0
    k = open_pos
    while k < len(text):
        ch = text[k]
        if ch == "\\":
            k += 2
            continue
        if ch == opening:
            depth += 1
        elif ch == closing:
            depth -= 1
            if depth == 0:
                return k
        k += 1
    return None


def _unwrap_commands(text: str, pattern: re.Pattern[str] = _UNWRAP_RE) -> str:
    """``\\text{abc}`` -> ``abc`` (and the other :data:`_UNWRAP` commands), innermost or outermost alike."""
    for _ in range(64):  # each pass removes one command; answers are short
        m = pattern.search(text)
        if m is None:
            return text
        close = _matching(text, m.end() - 1, "{", "}")
        if close is None:
            return text
        text = text[: m.start()] + text[m.end(): close] + text[close + 1:]
    return text


def _light_normalize(text: str) -> str:
    """Everything of :func:`normalize_answer` except removing whitespace and lower-casing: the form that
    :func:`split_unit` and :func:`is_word_answer` look at."""
    s = text.strip()
    s = s.replace("\\$", "").replace("$", "")
    s = _unwrap_commands(s)
    s = _INVISIBLE_DELIMITER_RE.sub("", s)
    s = _DELIMITER_SIZE_RE.sub("", s)
    s = _FRAC_VARIANT_RE.sub(r"\\frac", s)
    s = _SPACING_RE.sub(" ", s)
    s = _DEGREE_RE.sub("°", s)
    s = s.replace("\\%", "%")
    s = s.strip()
    while s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    m = _CHOICE_RE.fullmatch(s)
    return m.group(1) if m else s


def strip_boxes(text: str) -> str:
    """``text`` without ``\\boxed{}`` / ``\\fbox{}`` wrappers: a box inside the boxed answer is part of the
    answer (``\\boxed{7}1`` is 71), not a second answer for math-verify to pick out."""
    return _unwrap_commands(text, _BOX_RE)


def is_word_answer(text: str) -> bool:
    """Whether an answer is words (``Yes``, ``no solution``, ``Tuesday``), not math: letters, spaces,
    hyphens and apostrophes only, at least two letters, and not one of :data:`MATH_WORDS`."""
    s = _light_normalize(text)
    return bool(_WORD_RE.fullmatch(s)) and s.lower() not in MATH_WORDS


def normalize_answer(text: str) -> str:
    """The form in which two answers that are the same text are equal (see the module docstring)."""
    s = _light_normalize(text)
    if is_word_answer(s):
        return _WHITESPACE_RE.sub(" ", s).lower()
    s = _COMMAND_SPACE_RE.sub("\\1\0", s)  # "\pi r" must not become "\pir"
    return _WHITESPACE_RE.sub("", s).replace("\0", " ")


# ---- plain-text math -> LaTeX -------------------------------------------------------------------------
_NOT_AFTER = r"(?<![\\A-Za-z])"
_FUNCTIONS_RE = re.compile(_NOT_AFTER + r"(arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|cot|sec|csc|log|ln|exp)"
                           r"(?![A-Za-z])")
_CONSTANTS = {"pi": "\\pi ", "infinity": "\\infty ", "inf": "\\infty ", "oo": "\\infty "}
_CONSTANTS_RE = re.compile(_NOT_AFTER + r"(pi|infinity|inf|oo)(?![A-Za-z])")
_CALL_RE = {name: re.compile(_NOT_AFTER + name + r"\s*\(") for name in ("sqrt", "cbrt")}
_SQRT_TOKEN_RE = re.compile(_NOT_AFTER + r"sqrt\s*(\d+|[A-Za-z])")
_CARET_PAREN_RE = re.compile(r"\^\s*\(")
_CARET_RUN_RE = re.compile(r"\^\s*(-?\d{2,}|-\d|-[A-Za-z])")
_TEX_FRAC_RE = (re.compile(r"\\[dtc]?frac\s*(\d)\s*(\d)"), re.compile(r"\\[dtc]?frac\s*(\d)\s*(?=\{)"),
                re.compile(r"\\[dtc]?frac\s*(\{[^{}]*\})\s*(\d)"))
_TEX_SQRT_RE = re.compile(r"\\sqrt\s*(\d)")
_RELATIONS = ((">=", "\\geq "), ("<=", "\\leq "), ("!=", "\\neq "), ("**", "^"))


def _rewrite_calls(text: str, pattern: re.Pattern[str], make: Callable[[str], str]) -> str:
    """Replace every ``name(arg)`` that ``pattern`` finds (up to the opening parenthesis) by ``make(arg)``,
    with balanced parentheses; an unbalanced one is left as it is."""
    start = 0
    for _ in range(64):
        m = pattern.search(text, start)
        if m is None:
            break
        close = _matching(text, m.end() - 1, "(", ")")
        if close is None:
            start = m.end()
            continue
        replacement = make(text[m.end(): close])
        text = text[: m.start()] + replacement + text[close + 1:]
        start = m.start() + 1  # arguments may hold more calls
    return text


def plain_to_latex(text: str) -> str:
    """Plain-text math as LaTeX (see the module docstring); LaTeX input comes back unchanged but for TeX's
    one-token arguments (``\\frac12``, ``\\sqrt3``), which are braced."""
    s = text
    for plain, latex in _RELATIONS:
        s = s.replace(plain, latex)
    s = _rewrite_calls(s, _CALL_RE["sqrt"], lambda a: "\\sqrt{" + a + "}")
    s = _rewrite_calls(s, _CALL_RE["cbrt"], lambda a: "\\sqrt[3]{" + a + "}")
    s = _SQRT_TOKEN_RE.sub(r"\\sqrt{\1}", s)
    s = _rewrite_calls(s, _CARET_PAREN_RE, lambda a: "^{" + a + "}")
    s = _CARET_RUN_RE.sub(r"^{\1}", s)
    s = _FUNCTIONS_RE.sub(r"\\\1", s)
    s = _CONSTANTS_RE.sub(lambda m: _CONSTANTS[m.group(1)], s)
    s = _TEX_FRAC_RE[0].sub(r"\\frac{\1}{\2}", s)
    s = _TEX_FRAC_RE[1].sub(r"\\frac{\1}", s)
    s = _TEX_FRAC_RE[2].sub(r"\\frac\1{\2}", s)
    s = _TEX_SQRT_RE.sub(r"\\sqrt{\1}", s)
    return s.strip()


# ---- units -----------------------------------------------------------------------------------------------
# unit -> its other spellings (compared lower-cased; a plural "s" is tried off too)
UNITS: dict[str, tuple[str, ...]] = {
    "mm": ("millimeter", "millimetre"), "cm": ("centimeter", "centimetre"), "m": ("meter", "metre"),
    "km": ("kilometer", "kilometre"), "in": ("inch", "inches"), "ft": ("foot", "feet"), "yd": ("yard",),
    "mi": ("mile",), "mg": ("milligram",), "g": ("gram",), "kg": ("kilogram",), "lb": ("pound", "lbs"),
    "oz": ("ounce",), "ml": ("milliliter", "millilitre"), "l": ("liter", "litre"), "s": ("sec", "second"),
    "min": ("minute",), "h": ("hr", "hour"), "day": (), "week": (), "month": (), "year": ("yr",),
    "°": ("deg", "degree"), "rad": ("radian",), "%": ("percent", "per cent"), "dollar": ("usd",),
    "cent": ("¢",), "mph": ("miles per hour", "mile per hour"), "km/h": ("kmph", "kph", "kilometers per hour"),
    "m/s": ("meters per second", "metres per second"),
}
_UNIT_NAMES = {alias: unit for unit, aliases in UNITS.items() for alias in (unit, *aliases)}
_POWER_WORDS = {"square": "2", "sq": "2", "cubic": "3", "cu": "3"}
_NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+|\\frac\{[^{}]+\}\{[^{}]+\})"
_NUMBER_UNIT_RE = re.compile(rf"(?P<num>{_NUMBER})(?P<space>\s*)(?P<unit>[^\d\s].*)")
_CURRENCY_RE = re.compile(rf"\s*\\\$\s*({_NUMBER})\s*")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_POWER_RE = re.compile(r"(?P<base>.+?)\s*\^\s*\{?\s*(?P<power>\d)\s*\}?")


def _unit_name(text: str) -> str | None:
    """The canonical name of a unit written ``text`` (with ``^2`` / ``square`` powers), or None."""
    t = text.strip().lower().rstrip(".")
    power = ""
    words = t.split(" ", 1)
    if len(words) == 2 and words[0].rstrip(".") in _POWER_WORDS:
        t, power = words[1].strip(), _POWER_WORDS[words[0].rstrip(".")]
    m = _POWER_RE.fullmatch(t)
    if m:
        t, power = m.group("base").strip(), m.group("power")
    for candidate in (t, t[:-1] if t.endswith("s") and len(t) > 2 else None,
                      t[:-2] if t.endswith("es") and len(t) > 3 else None):
        if candidate and candidate in _UNIT_NAMES:
            return _UNIT_NAMES[candidate] + (f"^{power}" if power else "")
    return None


def split_unit(text: str) -> tuple[str, str | None]:
    """``(number, unit)`` of an answer that is a number followed by a unit of :data:`UNITS`; ``(text, None)``
    otherwise. A one-letter unit needs a space before it (``2 m`` is metres, ``2m`` may be a product). An
    escaped dollar sign before the number is the unit ``dollar`` (``\\$5``; a bare ``$`` is math mode)."""
    currency = _CURRENCY_RE.fullmatch(text)
    if currency:
        return currency.group(1), "dollar"
    s = _light_normalize(text)
    m = _NUMBER_UNIT_RE.fullmatch(s)
    if m is None:
        return text, None
    unit = _unit_name(m.group("unit"))
    if unit is None or (len(m.group("unit").strip()) == 1 and not m.group("space") and unit not in ("°", "%")):
        return text, None
    number = m.group("num")
    if _THOUSANDS_RE.fullmatch(number):
        number = number.replace(",", "")
    return number, unit

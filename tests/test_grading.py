"""Grading: every pair of the grading corpus scored as labelled (reproduced and equivalent golds 1, near misses
0), the text forms behind it (poer_jax/rewards/answer_text.py), and scripts/grading_table.py."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from poer_jax.rewards.answer_text import is_word_answer, normalize_answer, plain_to_latex, split_unit, strip_boxes
from poer_jax.rewards.answers import grade_completion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import grading_table  # noqa: E402

ROWS = grading_table.load_corpus(grading_table.CORPUS)


def test_the_corpus_has_each_kind_of_pair():
    kinds = {(r["category"], r["expected"]) for r in ROWS}
    assert len(ROWS) >= 150
    for category in ("words", "tuples", "intervals", "units"):
        assert {(category, 0), (category, 1)} <= kinds, category
    assert {r["expected"] for r in ROWS if r["category"] == "near_miss"} == {0}
    assert {r["expected"] for r in ROWS if r["category"] in ("plain_text", "latex_forms")} == {1}
    assert any(r.get("solution") and r.get("gold") is None for r in ROWS)  # golds given as a full solution only


def test_every_corpus_pair_is_graded_as_labelled():
    """Each gold reproduced (or written another way) scores 1, each wrong answer 0: the grader of the training
    reward and of poer_jax.evaluate (grade_completion) on a completion that boxes the prediction last."""
    wrong = []
    for r in ROWS:
        got = grade_completion(grading_table.completion_for(r["prediction"]), r.get("solution"), r.get("gold"))
        if got.correct is not bool(r["expected"]):
            wrong.append(f"[{r['category']}] gold {r.get('gold') or r.get('solution')!r} prediction "
                         f"{r['prediction']!r}: expected {r['expected']}, got {got.correct}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("plain, latex", [
    ("sqrt(3)", "\\sqrt{3}"), ("2^(n-1)", "2^{n-1}"), ("(n+1)^(n-1)", "(n+1)^{n-1}"),
    ("1-1/2^(1/n)", "1-1/2^{1/n}"), ("n(n+1)*2^(n-2)", "n(n+1)*2^{n-2}"), ("sqrt(sqrt(2)+1)", "\\sqrt{\\sqrt{2}+1}"),
    ("2^(1/(n+1))", "2^{1/(n+1)}"), ("cbrt(x)", "\\sqrt[3]{x}"), ("2^10", "2^{10}"), ("x^-1", "x^{-1}"),
    ("pi/2", "\\pi /2"), ("(-oo, 2]", "(-\\infty , 2]"), ("ln(2)", "\\ln(2)"), ("x**2", "x^2"), ("x>=1", "x\\geq 1"),
    ("\\tfrac12", "\\frac{1}{2}"), ("\\sqrt3", "\\sqrt{3}"), ("\\frac{\\pi}{2}", "\\frac{\\pi}{2}"),
    ("\\sqrt{3}", "\\sqrt{3}"), ("sqrt(2", "sqrt(2"), ("pineapple", "pineapple"), ("\\infty", "\\infty"),
])
def test_plain_text_math_as_latex(plain, latex):
    assert plain_to_latex(plain) == latex


@pytest.mark.parametrize("a, b", [
    ("$\\frac{1}{2}$", "\\dfrac{1}{2}"), ("\\boxed{7}", "7."), ("\\text{Yes}", "yes"), ("\\left(1, 2\\right)", "(1,2)"),
    ("30^{\\circ}", "30°"), ("50\\%", "50%"), ("10\\,\\text{cm}", "10 cm"), ("(B)", "B"), ("\\pi r", "\\pi  r"),
    ("No solution", "no  solution"),
])
def test_normal_form_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize("a, b", [("\\pi r", "\\pir"), ("Yes", "Yes and no"), ("N", "n"), ("(1,2)", "[1,2]"),
                                  ("2^{n-1}", "2^n-1"), ("12", "1.2")])
def test_normal_form_different(a, b):
    assert normalize_answer(a) != normalize_answer(b)


@pytest.mark.parametrize("text, expected", [
    ("10 cm", ("10", "cm")), ("10\\text{ centimeters}", ("10", "cm")), ("1,500 m", ("1500", "m")),
    ("12 \\text{ m}^2", ("12", "m^2")), ("12 square feet", ("12", "ft^2")), ("30^\\circ", ("30", "°")),
    ("50\\%", ("50", "%")), ("\\$5", ("5", "dollar")), ("45 mph", ("45", "mph")), ("3 hours", ("3", "h")),
    ("2m", ("2m", None)), ("2n", ("2n", None)), ("(1,2)", ("(1,2)", None)), ("5 apples", ("5 apples", None)),
])
def test_number_and_unit(text, expected):
    assert split_unit(text) == expected


@pytest.mark.parametrize("text, words", [("Yes", True), ("\\text{no solution}", True), ("Tuesday.", True),
                                         ("pi", False), ("infinity", False), ("x", False), ("2n", False),
                                         ("x = 2", False)])
def test_word_answers(text, words):
    assert is_word_answer(text) is words


def test_a_box_inside_the_answer_is_part_of_it():
    assert strip_boxes("\\boxed{7}1") == "71"
    assert grade_completion("so \\boxed{\\boxed{7}1}", None, "7").correct is False
    assert grade_completion("so \\boxed{\\boxed{7}}", None, "7").correct is True


def test_table_script_prints_and_writes_the_confusion_table(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in [
        {"category": "plain_text", "gold": "sqrt(3)", "prediction": "sqrt(3)", "expected": 1},
        {"category": "near_miss", "gold": "2^(n-1)", "prediction": "2^n-1", "expected": 0},
        {"category": "units", "gold": "10 cm", "prediction": "10 m", "expected": 0}]))
    out = tmp_path / "grading.json"
    # "before": answers.py as committed at HEAD, whatever that is (the check is that the revision is graded too)
    assert grading_table.main(["--corpus", str(corpus), "--json", str(out), "--baseline-rev", "HEAD"]) == 0
    printed = capsys.readouterr().out
    assert "| category | pairs | before (HEAD): TP / FN / FP / TN | now: TP / FN / FP / TN |" in printed
    assert re.search(r"\| plain_text \| 1 \| [0-9 /]+ \| 1 / 0 / 0 / 0 \|", printed), printed
    assert re.search(r"\| \*\*all\*\* \| 3 \| [0-9 /]+ \| 1 / 0 / 0 / 2 \|", printed), printed
    res = json.loads(out.read_text())
    assert res["pairs"] == 3 and res["tables"]["now"]["units"] == {"tp": 0, "fn": 0, "fp": 0, "tn": 1}
    assert [r["score/now"] for r in res["rows"]] == [1, 0, 0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "x", "gold": "1", "prediction": "1"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        grading_table.load_corpus(bad)

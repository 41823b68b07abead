"""A synthetic arithmetic-reasoning task, small enough for a tiny model trained on a CPU.

Problems are generated deterministically from a seed, in open-rs's columns (``problem``, ``solution``,
``answer``), with a short worked solution that ends in ``\\boxed{answer}``:

    problem:  "Compute 23 + 45 - 7."
    solution: "23 + 45 = 68. 68 - 7 = 61. \\boxed{61}"
    answer:   "61"

    problem:  "Tom has 3 boxes of 12 apples and eats 5. How many apples are left?"
    solution: "3 * 12 = 36. 36 - 5 = 31. \\boxed{31}"

Expressions are evaluated left to right, which is also standard precedence because ``*`` may only be
the first operation. Intermediate results never go negative unless ``allow_negative``. Difficulty knobs:
the number of operands and the operand range. ``make_toy_splits`` returns train and held-out test rows
with no problem text in common. ``toy_completion(row)`` is the supervised warm-start target in the
R1 format that the format and accuracy rewards expect: ``"<work>\\n</think>\\n\\boxed{answer}"`` (the
tiny tokenizer's generation prompt already opens ``<think>\\n``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ToyTaskConfig", "generate_toy_rows", "make_toy_splits", "toy_completion", "write_jsonl"]

_NAMES = ("Tom", "Ann", "Bob", "Mia", "Sam", "Eva", "Leo", "Ivy")
_ITEMS = ("apples", "pens", "cards", "eggs", "books", "coins")


@dataclass(frozen=True)
class ToyTaskConfig:
    """Difficulty knobs.

    min_operands / max_operands: operands of a "Compute ..." expression (>= 2).
    min_value / max_value: operand range (multipliers are 2..9 whatever the range).
    operations: allowed among "+", "-", "*".
    word_problem_fraction: share of word problems ("Tom has 3 boxes of 12 apples ...").
    allow_negative: let subtraction go below zero.
    """

    min_operands: int = 2
    max_operands: int = 3
    min_value: int = 1
    max_value: int = 50
    operations: tuple[str, ...] = ("+", "-")
    word_problem_fraction: float = 0.3
    allow_negative: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError(
                f"need 2 <= min_operands <= max_operands, got {self.min_operands}, {self.max_operands}"
            )
        if not 0 <= self.min_value <= self.max_value:
            raise ValueError(f"need 0 <= min_value <= max_value, got {self.min_value}, {self.max_value}")
        bad = [op for op in self.operations if op not in ("+", "-", "*")]
        if bad or not self.operations:
            raise ValueError(f"operations must be a non-empty subset of '+', '-', '*', got {self.operations}")
        if not 0.0 <= self.word_problem_fraction <= 1.0:
            raise ValueError(f"word_problem_fraction must be in [0, 1], got {self.word_problem_fraction}")


def _row(problem: str, steps: list[tuple[int, str, int, int]], answer: int) -> dict[str, str]:
    work = " ".join(f"{a} {op} {b} = {r}." for a, op, b, r in steps)
    return {"problem": problem, "solution": f"{work} \\boxed{{{answer}}}", "answer": str(answer)}


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _expression(rng: random.Random, cfg: ToyTaskConfig) -> dict[str, str]:
    n = rng.randint(cfg.min_operands, cfg.max_operands)
    acc = rng.randint(cfg.min_value, cfg.max_value)
    text, steps = str(acc), []
    for pos in range(1, n):
        ops = [op for op in cfg.operations if op != "*" or pos == 1]  # keeps left-to-right == precedence
        if not cfg.allow_negative and acc < cfg.min_value:
            ops = [op for op in ops if op != "-"]
        op = rng.choice(ops or ["+"])
        if op == "*":
            b = rng.randint(2, 9)
        elif op == "-" and not cfg.allow_negative:
            b = rng.randint(cfg.min_value, min(cfg.max_value, acc))
        else:
            b = rng.randint(cfg.min_value, cfg.max_value)
        result = _apply(acc, op, b)
        steps.append((acc, op, b, result))
        text += f" {op} {b}"
        acc = result
    return _row(f"Compute {text}.", steps, acc)


def _word_problem(rng: random.Random, cfg: ToyTaskConfig) -> dict[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    hi = max(2, min(12, cfg.max_value))
    kind = rng.randrange(3)
    if kind == 0:
        boxes, per = rng.randint(2, 9), rng.randint(2, hi)
        total = boxes * per
        gone = rng.randint(1, total - 1)
        verb = "eats" if item in ("apples", "eggs") else "gives away"
        problem = f"{name} has {boxes} boxes of {per} {item} and {verb} {gone}. How many {item} are left?"
        return _row(problem, [(boxes, "*", per, total), (total, "-", gone, total - gone)], total - gone)
    if kind == 1:
        have = rng.randint(max(1, cfg.min_value), cfg.max_value)
        more = rng.randint(max(1, cfg.min_value), cfg.max_value)
        given = rng.randint(1, have + more)
        problem = (
            f"{name} has {have} {item}, buys {more} more and gives away {given}. "
            f"How many {item} does {name} have now?"
        )
        s = have + more
        return _row(problem, [(have, "+", more, s), (s, "-", given, s - given)], s - given)
    bags, per = rng.randint(2, 9), rng.randint(2, hi)
    problem = f"{name} buys {bags} bags with {per} {item} each. How many {item} is that?"
    return _row(problem, [(bags, "*", per, bags * per)], bags * per)


def generate_toy_rows(
    num_rows: int, seed: int, cfg: ToyTaskConfig | None = None, exclude: Iterable[str] = ()
) -> list[dict[str, str]]:
    """``num_rows`` distinct problems (none of whose text is in ``exclude``), deterministic in ``seed``."""
    cfg = cfg or ToyTaskConfig()
    rng = random.Random(seed)
    seen = set(exclude)
    rows: list[dict[str, str]] = []
    attempts = 0
    while len(rows) < num_rows:
        attempts += 1
        if attempts > 50 * num_rows + 1000:
            raise ValueError(
                f"could only generate {len(rows)} distinct problems of {num_rows}: widen the "
                f"number range or the number of operands ({cfg})"
            )
        row = _word_problem(rng, cfg) if rng.random() < cfg.word_problem_fraction else _expression(rng, cfg)
        if row["problem"] not in seen:
            seen.add(row["problem"])
            rows.append(row)
    return rows


def make_toy_splits(
    num_train: int, num_test: int, seed: int, cfg: ToyTaskConfig | None = None
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and held-out test rows: one stream of distinct problems, the first ``num_train`` for train."""
    rows = generate_toy_rows(num_train + num_test, seed, cfg)
    return rows[:num_train], rows[num_train:]


def toy_completion(row: dict[str, str]) -> str:
    """Warm-start target: the worked steps, ``"\\n</think>\\n"``, then ``\\boxed{answer}``."""
    work = row["solution"].rsplit("\\boxed{", 1)[0].rstrip()
    return f"{work}\n</think>\n\\boxed{{{row['answer']}}}"


def write_jsonl(rows: Iterable[dict[str, str]], path: str | Path) -> Path:
    """Write rows as JSON lines (parent directories created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p

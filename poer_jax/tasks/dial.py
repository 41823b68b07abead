"""A long-answer task for POER's regime: turning a 10-position dial through a list of labelled turns.

Problems are generated deterministically from a seed, in open-rs's columns (``problem``, ``solution``,
``answer``):

    problem:  "Dial at 4. Turn a3 b7 c2 d9 e5."
    solution: "a3:7 b7:4 c2:6 d9:5 e5:0 \\boxed{0}"
    answer:   "0"

Each step of the worked solution names the next turn (label and amount, looked up in the problem by its
label) and the position after it: ``t_i = (t_{i-1} + v_i) mod 10``, starting from the dial's position.
With 30-50 turns an answer is 150-250 tokens of a character-level tokenizer (5 tokens a step), in the
range of answers that the paper's reasoning models truncate by a few hundred tokens out of thousands.

Why this task: POER rolls out only the tail of a cached answer (Eq. 3), so the tokens that decide
correctness must occur everywhere in an answer, not only at its start. Here

* one skill recurs at every step (look a turn up by its label, add it modulo 10), so learning it on the
  steps inside a late truncation window is learning the skill every step uses;
* the final answer depends on every step: a single wrong position shifts every later position by the same
  non-zero amount, so the boxed answer is wrong; only two or more errors can cancel;
* nothing in the format is free text: a step is five decisive or structural tokens, so even a window of
  10 % of the answer holds several steps.

Difficulty knobs: the number of turns (``min_turns`` .. ``max_turns``) and the largest turn
(``max_turn``, 1..9). ``make_dial_splits`` returns train and held-out rows with no problem in common;
``dial_completion(row)`` is the supervised warm-start target in the R1 format the rewards expect:
``"<steps>\\n</think>\\n\\boxed{answer}"`` (the tiny tokenizer's generation prompt opens ``<think>\\n``).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

__all__ = ["LABELS", "DialTaskConfig", "dial_completion", "generate_dial_rows", "make_dial_splits"]

LABELS = string.ascii_lowercase + string.ascii_uppercase  # one label per turn: at most 52 turns
POSITIONS = 10


@dataclass(frozen=True)
class DialTaskConfig:
    """Difficulty knobs: turns per problem and the largest turn (amounts are 1..max_turn)."""

    min_turns: int = 30
    max_turns: int = 50
    max_turn: int = 9

    def __post_init__(self) -> None:
        if not 2 <= self.min_turns <= self.max_turns <= len(LABELS):
            raise ValueError(f"dial task: need 2 <= min_turns <= max_turns <= {len(LABELS)}, got "
                             f"{self.min_turns}, {self.max_turns}")
        if not 1 <= self.max_turn < POSITIONS:
            raise ValueError(f"dial task: max_turn must be in [1, {POSITIONS - 1}], got {self.max_turn}")


def _row(rng: random.Random, cfg: DialTaskConfig) -> dict[str, str]:
    n = rng.randint(cfg.min_turns, cfg.max_turns)
    start = rng.randrange(POSITIONS)
    turns = [rng.randint(1, cfg.max_turn) for _ in range(n)]
    pos, steps = start, []
    for label, v in zip(LABELS, turns, strict=False):
        pos = (pos + v) % POSITIONS
        steps.append(f"{label}{v}:{pos}")
    problem = f"Dial at {start}. Turn " + " ".join(f"{lab}{v}" for lab, v in zip(LABELS, turns, strict=False)) + "."
    return {"problem": problem, "solution": " ".join(steps) + f" \\boxed{{{pos}}}", "answer": str(pos)}


def generate_dial_rows(num_rows: int, seed: int, cfg: DialTaskConfig | None = None) -> list[dict[str, str]]:
    """``num_rows`` distinct problems, deterministic in ``seed``."""
    cfg = cfg or DialTaskConfig()
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < num_rows:  # 9^30 problems at the smallest setting: repeats are vanishingly rare
        row = _row(rng, cfg)
        if row["problem"] not in seen:
            seen.add(row["problem"])
            rows.append(row)
    return rows


def make_dial_splits(num_train: int, num_test: int, seed: int, cfg: DialTaskConfig | None = None
                     ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and held-out rows: one stream of distinct problems, the first ``num_train`` for train."""
    rows = generate_dial_rows(num_train + num_test, seed, cfg)
    return rows[:num_train], rows[num_train:]


def dial_completion(row: dict[str, str]) -> str:
    """Warm-start target: the steps, ``"\\n</think>\\n"``, then ``\\boxed{answer}``."""
    work = row["solution"].rsplit("\\boxed{", 1)[0].rstrip()
    return f"{work}\n</think>\n\\boxed{{{row['answer']}}}"

"""A long-answer task for POER's regime: a chain of additions modulo 10, worked step by step.

Problems are generated deterministically from a seed, in open-rs's columns (``problem``, ``solution``,
``answer``):

    problem:  "Start 3 8, add 2, 4 steps."
    solution: "04:3+8+2=3 03:8+3+2=3 02:3+3+2=8 01:3+8+2=3 \\boxed{83}"
    answer:   "83"

From the two start digits, each step adds the last two digits and the problem's constant modulo 10:
``x_{i+1} = (x_{i-1} + x_i + k) mod 10``. A step is written ``NN:a+b+k=c`` with a label that counts the
steps left down to ``01`` (the model knows when to stop without counting: the label tells it), the two
digits it adds, the constant and the new digit; the answer is the last two digits. With 14-22 steps an
answer is about 170-260 tokens of a character-level tokenizer (11 tokens a step).

Why this task: POER rolls out only the tail of a cached answer (Eq. 3), so the tokens that decide
correctness must occur everywhere in an answer, not only at its start. Here

* one skill recurs at every step (copy the last two digits and the constant, add them modulo 10, count the
  label down), so learning it on the steps inside a late truncation window is learning the skill every step
  uses;
* the final answer depends on every step: an error in any digit changes the two digits after it by
  ``e F_j`` and ``e F_{j+1}`` (Fibonacci numbers, ``j`` steps later), and two consecutive Fibonacci numbers are
  never both divisible by 2 or by 5, so a single error always changes the two-digit answer; an error in a
  label changes the number of steps;
* every operand of a step sits a fixed number of tokens before it (in the step itself or the one before),
  so a 2-layer model can learn the step from a short supervised run, which gives RL a policy that is right
  up to the reused tail often enough to learn from (the paper starts from R1-Distill models at 30-50 %).

Difficulty knobs: the number of steps (``min_steps`` .. ``max_steps``, at most 99) and the largest constant
(``max_constant``, 0..9). ``make_chain_splits`` returns train and held-out rows with no problem in common;
``chain_completion(row)`` is the supervised warm-start target in the R1 format the rewards expect:
``"<steps>\\n</think>\\n\\boxed{answer}"`` (the tiny tokenizer's generation prompt opens ``<think>\\n``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = [
    "CHAIN_ERRORS", "ChainTaskConfig", "chain_completion", "chain_error", "chain_row", "generate_chain_rows",
    "make_chain_splits", "num_chain_problems",
]


@dataclass(frozen=True)
class ChainTaskConfig:
    """Difficulty knobs: steps per problem and the largest constant added at each step (0..max_constant)."""

    min_steps: int = 14
    max_steps: int = 22
    max_constant: int = 9

    def __post_init__(self) -> None:
        if not 2 <= self.min_steps <= self.max_steps <= 99:
            raise ValueError(f"chain task: need 2 <= min_steps <= max_steps <= 99, got {self.min_steps}, "
                             f"{self.max_steps}")
        if not 0 <= self.max_constant <= 9:
            raise ValueError(f"chain task: max_constant must be in [0, 9], got {self.max_constant}")


def num_chain_problems(cfg: ChainTaskConfig) -> int:
    """How many distinct problems the knobs allow: start pairs x constants x step counts."""
    return 100 * (cfg.max_constant + 1) * (cfg.max_steps - cfg.min_steps + 1)


def chain_row(a: int, b: int, k: int, n: int) -> dict[str, str]:
    """The row of start digits ``a b``, constant ``k`` and ``n`` steps."""
    problem = f"Start {a} {b}, add {k}, {n} steps."
    steps = []
    for left in range(n, 0, -1):
        c = (a + b + k) % 10
        steps.append(f"{left:02d}:{a}+{b}+{k}={c}")
        a, b = b, c
    answer = f"{a}{b}"
    return {"problem": problem, "solution": " ".join(steps) + f" \\boxed{{{answer}}}", "answer": answer}


def _row(rng: random.Random, cfg: ChainTaskConfig) -> dict[str, str]:
    a, b = rng.randrange(10), rng.randrange(10)
    k, n = rng.randint(0, cfg.max_constant), rng.randint(cfg.min_steps, cfg.max_steps)
    return chain_row(a, b, k, n)


def generate_chain_rows(num_rows: int, seed: int, cfg: ChainTaskConfig | None = None) -> list[dict[str, str]]:
    """``num_rows`` distinct problems, deterministic in ``seed``; fails if the knobs allow fewer."""
    cfg = cfg or ChainTaskConfig()
    if num_rows > num_chain_problems(cfg):
        raise ValueError(f"chain task: {num_rows} distinct problems asked for, but the knobs allow only "
                         f"{num_chain_problems(cfg)} (100 start pairs x {cfg.max_constant + 1} constants x "
                         f"{cfg.max_steps - cfg.min_steps + 1} step counts)")
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < num_rows:
        row = _row(rng, cfg)
        if row["problem"] not in seen:
            seen.add(row["problem"])
            rows.append(row)
    return rows


def make_chain_splits(num_train: int, num_test: int, seed: int, cfg: ChainTaskConfig | None = None
                      ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and held-out rows: one stream of distinct problems, the first ``num_train`` for train."""
    rows = generate_chain_rows(num_train + num_test, seed, cfg)
    return rows[:num_train], rows[num_train:]


def chain_completion(row: dict[str, str]) -> str:
    """Warm-start target: the steps, ``"\\n</think>\\n"``, then ``\\boxed{answer}``."""
    work = row["solution"].rsplit("\\boxed{", 1)[0].rstrip()
    return f"{work}\n</think>\n\\boxed{{{row['answer']}}}"


_PROBLEM = re.compile(r"Start (\d) (\d), add (\d), (\d+) steps\.")
_STEP = re.compile(r"(\d+):(\d)\+(\d)\+(\d)=(\d)")
_BOXED = re.compile(r"\\boxed\{([^}]*)\}")
# what went wrong first in an answer, in the order it is checked
CHAIN_ERRORS = ("label", "copy", "constant", "sum", "steps", "no_box", "box_first", "box_second", "box_other",
                "right")


def chain_error(problem: str, completion: str) -> tuple[str, int]:
    """The first error of a completion of a chain problem and the number of steps left where it happened.

    Walks the completion's steps (``NN:a+b+k=c``) against the problem's chain: a wrong label ("label"), a wrong
    operand copied from the step before ("copy"), a wrong constant ("constant"), a wrong sum ("sum"); then the
    number of steps ("steps": stopped early or went on), a missing ``\\boxed{}`` ("no_box") and the boxed answer
    against the completion's own last two digits: only the first digit wrong ("box_first"), only the second
    ("box_second"), anything else ("box_other"). "right" when none applies (then the answer is right). Steps
    left is the wrong step's label (0 for errors after the steps). Where the errors of a policy sit tells what
    RL must teach it and whether POER's reused prefix already holds them (docs/benchmarks.md)."""
    m = _PROBLEM.fullmatch(problem.strip())
    if m is None:
        raise ValueError(f"chain_error: not a chain problem: {problem!r}")
    a, b, k, n = (int(x) for x in m.groups())
    steps = _STEP.findall(completion)
    for i, (label, x, y, kk, c) in enumerate(steps[:n]):
        left = n - i
        kind = ("label" if int(label) != left else "copy" if (int(x), int(y)) != (a, b) else
                "constant" if int(kk) != k else "sum" if int(c) != (a + b + k) % 10 else None)
        if kind is not None:
            return kind, left
        a, b = b, (a + b + k) % 10
    if len(steps) != n:
        return "steps", max(n - len(steps), 0)
    boxed = _BOXED.findall(completion)
    if not boxed:
        return "no_box", 0
    got, want = boxed[-1].strip(), f"{a}{b}"
    if got == want:
        return "right", 0
    if len(got) == 2 and got[1] == want[1]:
        return "box_first", 0
    if len(got) == 2 and got[0] == want[0]:
        return "box_second", 0
    return "box_other", 0

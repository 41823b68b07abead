"""The grader's confusion table on the grading corpus, per category, now and (optionally) at another revision.

    PYTHONPATH=. python scripts/grading_table.py [--corpus tests/assets/grading_corpus.jsonl]
        [--baseline-rev REV] [--json docs/results/grading.json]

Each corpus row is a gold (``gold``: the answer column, and/or ``solution``: a full reference solution), a
prediction (what the model put in its last ``\\boxed{}``), whether it is right (``expected``: 1 or 0) and a
category. The prediction is graded as the training reward and ``poer_jax.evaluate`` grade it
(``poer_jax.rewards.answers.grade_completion`` on a completion ending in ``\\boxed{prediction}``). Per category
the table counts right answers scored 1 (TP) and 0 (FN), and wrong answers scored 1 (FP) and 0 (TN).
``--baseline-rev`` grades the same rows with the grader as it was at that git revision
(and the modules it imports from the working tree), for a before / after table. Prints the table and the
rows graded against their label; writes everything to ``--json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "assets" / "grading_corpus.jsonl"
Grader = Callable[[str, "str | None", "str | None"], "bool | None"]


def load_corpus(path: Path) -> list[dict[str, Any]]:
    """The corpus rows; a row without a gold, a prediction, a 0/1 label or a category is an error naming it."""
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("gold") is None and row.get("solution") is None:
            raise ValueError(f"{path}:{i}: needs 'gold' or 'solution'")
        if not isinstance(row.get("prediction"), str) or row.get("expected") not in (0, 1) or \
                not isinstance(row.get("category"), str):
            raise ValueError(f"{path}:{i}: needs a string 'prediction', 'expected' 0 or 1 and a 'category'")
        rows.append(row)
    return rows


def completion_for(prediction: str) -> str:
    """The completion a model answering ``prediction`` writes (R1 format, the answer boxed last)."""
    return f"<think>\nworking\n</think>\nThe answer is $\\boxed{{{prediction}}}$."


ANSWERS_PATHS = ("poer_jax/rewards/answers.py", "poer_jax/eval/answers.py")


def module_at(rev: str) -> ModuleType:
    """The grader (``poer_jax/rewards/answers.py``, before 2026-12-06 ``poer_jax/eval/answers.py``) as it was at git
    revision ``rev``, imported under another name."""
    for where in ANSWERS_PATHS:
        shown = subprocess.run(["git", "show", f"{rev}:{where}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode == 0:
            source = shown.stdout
            break
    else:
        raise SystemExit(f"--baseline-rev {rev}: no {' or '.join(ANSWERS_PATHS)} at that revision")
    path = Path(tempfile.mkdtemp(prefix="grading_table_"))
    file = path / f"answers_{rev.replace('/', '_')}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(file.stem, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[file.stem] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def grader_of(module: ModuleType) -> Grader:
    return lambda prediction, solution, gold: module.grade_completion(completion_for(prediction), solution,
                                                                      gold).correct


def grade_all(rows: list[dict[str, Any]], grade: Grader) -> tuple[list[int], float]:
    """(0/1 per row: None counts as 0, seconds)."""
    t0 = time.perf_counter()
    out = [int(bool(grade(r["prediction"], r.get("solution"), r.get("gold")))) for r in rows]
    return out, time.perf_counter() - t0


def confusion(rows: list[dict[str, Any]], scores: list[int]) -> dict[str, dict[str, int]]:
    """category -> {tp, fn, fp, tn}, plus "all"."""
    table: dict[str, dict[str, int]] = {}
    for row, score in zip(rows, scores, strict=True):
        cell = ("tp" if score else "fn") if row["expected"] else ("fp" if score else "tn")
        for cat in (row["category"], "all"):
            table.setdefault(cat, {"tp": 0, "fn": 0, "fp": 0, "tn": 0})[cell] += 1
    return dict(sorted(table.items(), key=lambda kv: kv[0] == "all"))


def format_table(tables: dict[str, dict[str, dict[str, int]]]) -> str:
    """Markdown: one row per category, TP / FN / FP / TN of each grader."""
    names = list(tables)
    head = "| category | pairs | " + " | ".join(f"{n}: TP / FN / FP / TN" for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + len(names))]
    for cat in tables[names[-1]]:
        cells = [tables[n][cat] for n in names]
        pairs = sum(cells[0].values())
        shown = " | ".join(f"{c['tp']} / {c['fn']} / {c['fp']} / {c['tn']}" for c in cells)
        lines.append(f"| {'**all**' if cat == 'all' else cat} | {pairs} | {shown} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--baseline-rev", default=None, help="git revision whose answers.py is the 'before' grader")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from poer_jax.rewards import answers

    rows = load_corpus(args.corpus)
    graders = {}
    if args.baseline_rev:
        graders[f"before ({args.baseline_rev})"] = grader_of(module_at(args.baseline_rev))
    graders["now"] = grader_of(answers)
    tables, scores, seconds = {}, {}, {}
    for name, grade in graders.items():
        scores[name], seconds[name] = grade_all(rows, grade)
        tables[name] = confusion(rows, scores[name])
    print(f"{len(rows)} pairs from {args.corpus}")
    print(format_table(tables))
    for name in graders:
        wrong = [(r, s) for r, s in zip(rows, scores[name], strict=True) if s != r["expected"]]
        print(f"\n{name}: {len(wrong)} graded against their label, {seconds[name]:.1f} s for all pairs")
        for r, s in wrong:
            gold = r.get("gold") if r.get("gold") is not None else f"solution {r['solution']!r}"
            print(f"  [{r['category']}] gold {gold!r} prediction {r['prediction']!r}: expected {r['expected']}, "
                  f"scored {s}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "corpus": str(args.corpus.relative_to(ROOT) if args.corpus.is_relative_to(ROOT) else args.corpus),
            "pairs": len(rows), "tables": tables, "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "rows": [{**r, **{f"score/{n}": scores[n][i] for n in graders}} for i, r in enumerate(rows)],
        }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

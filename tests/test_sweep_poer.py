"""scripts/sweep_poer.py's summary: accuracy at equal steps and at equal decoded tokens, paired tests, table, plot
(on hand-made runs: the training runs themselves are the demo's, tested in test_toy_demo / test_poer_loop)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import sweep_poer  # noqa: E402


def _run(name: str, decoded_per_step: float, accs: list[float], start: list[float], final: list[float]) -> dict:
    steps = [0, 10, 20]
    evals = [{"step": s, "decoded_tokens": s * decoded_per_step, "wall_s": s * 2.0, "accuracy": a}
             for s, a in zip(steps, accs, strict=True)]
    return {"arm": name, "evals": evals, "start_per_problem": start, "final_per_problem": final,
            "decoded_tokens_per_sample": decoded_per_step / 96, "rollout_s": 0.1, "update_s": 1.0, "step_s": 1.2}


def test_summary_compares_at_equal_steps_and_equal_decoded_tokens(tmp_path):
    start = [0.0] * 20 + [1.0] * 20
    runs = {"grpo": [_run("grpo", 10_000.0, [0.5, 0.7, 0.8], start, [1.0] * 36 + [0.0] * 4)],
            "poer_0.1": [_run("poer_0.1", 1_000.0, [0.5, 0.55, 0.6], start, [1.0] * 24 + [0.0] * 16)]}
    labels = {"grpo": "GRPO", "poer_0.1": "POER L = 15"}
    table = {r["arm"]: r for r in sweep_poer.summarise(runs, labels)}
    budget = 20 * 1_000.0  # POER's whole run decoded as much as GRPO's first 2 steps
    assert table["grpo"]["equal_decoded_tokens"] == budget
    assert table["grpo"]["accuracy_at_equal_decoded"] == pytest.approx(0.5 + 0.2 * budget / 100_000)
    assert table["poer_0.1"]["accuracy_at_equal_decoded"] == pytest.approx(0.6)
    assert table["grpo"]["accuracy_last"] == 0.8 and table["poer_0.1"]["accuracy_last"] == 0.6
    assert table["poer_0.1"]["vs_grpo_difference"] == pytest.approx(-0.3)
    assert table["poer_0.1"]["vs_grpo_p"] < 0.01 and "vs_grpo_p" not in table["grpo"]
    assert table["grpo"]["vs_start_p"] < 0.01
    md = sweep_poer.table_markdown(list(table.values()))
    assert "acc. at step 20" in md and "acc. at 20,000 decoded tokens" in md and "POER L = 15" in md
    sweep_poer.plot(runs, labels, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_interpolation_is_linear_between_evaluations():
    evals = [{"step": 0, "decoded_tokens": 0.0, "accuracy": 0.2}, {"step": 5, "decoded_tokens": 50.0, "accuracy": 0.4}]
    assert sweep_poer._interp(evals, "decoded_tokens", 25.0) == pytest.approx(0.3)
    assert sweep_poer._interp(evals, "step", 10) == pytest.approx(0.4)  # held past the last evaluation
    assert np.isfinite(sweep_poer._interp(evals, "decoded_tokens", 0.0))

"""scripts/bench_rollout.py with paper-style truncation (L about 10 % of an answer, as 300 of ~2700 tokens) on the
short-answer config (configs/arithmetic.py; on the demo's 200-token answers the script takes minutes, and its
numbers are in the README): POER decodes under a tenth of GRPO's tokens, ratios come from counted tokens and
measured times, and the step-time projection for the real models is reported next to the paper's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_rollout  # noqa: E402

from tests.helpers_runs import ARITHMETIC_WARM_START  # noqa: E402  (a supervised run here would take minutes)


@pytest.mark.slow
def test_poer_decodes_under_ten_percent_of_grpo(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench_rollout.main([
        f"--config={ROOT / 'configs' / 'arithmetic.py'}", "--steps", "2", "--workdir", str(tmp_path / "w"),
        "--json", str(out), "--sweep-L", "16", "--config.toy.num_train=64", "--config.toy.num_test=8",
        f"--config.warm_start.path={ARITHMETIC_WARM_START}",
        "--config.data.questions_per_step=8", "--config.cache.max_truncation=4", "--config.cache.budget=removed",
        "--config.rollout.group_size=4", "--config.mesh.num_devices=1"])
    assert rc == 0
    res = json.loads(out.read_text())
    poer, grpo = res["poer"], res["grpo"]
    assert poer["samples"] == grpo["samples"] == 2 * 8 * 4
    assert res["decoded_tokens_ratio"] < 0.10
    assert res["decoded_tokens_ratio"] == poer["decoded_tokens_per_sample"] / grpo["decoded_tokens_per_sample"]
    assert res["rollout_time_ratio"] == poer["rollout_s"] / grpo["rollout_s"]
    assert res["step_time_ratio"] == poer["step_s"] / grpo["step_s"]
    assert all(v > 0 for v in (poer["rollout_s"], grpo["rollout_s"], poer["step_s"], grpo["step_s"]))
    # POER decodes at most m <= L = 4 new tokens a sample with the "removed" budget; GRPO decodes whole answers
    assert poer["decoded_tokens_per_sample"] <= 4 < grpo["decoded_tokens_per_sample"]
    assert poer["prefilled_tokens_per_sample"] > grpo["prefilled_tokens_per_sample"]
    assert poer["mean_L"] == 4 and res["sweep_L"][0]["mean_L"] == 16
    assert res["sweep_L"][0]["decoded_tokens_per_sample"] > poer["decoded_tokens_per_sample"]
    # the critical path, per strategy: POER's continuations stop within m <= 4 tokens, so its decode loop runs at
    # most 3 steps a rollout (the first token comes from prefill); GRPO's runs to its longest answer
    for r in (poer, grpo):
        assert len(r["per_step"]) == 2 and all(s["rollout/decode_steps"] >= s["rollout/continuation_max"] - 1
                                               for s in r["per_step"])
        assert 0 < r["row_utilisation"] <= 1 and r["continuation_p50"] <= r["continuation_p95"] <= r["continuation_max"]
        assert r["prefill_s"] + r["decode_s"] <= r["rollout_s"] + 1e-9 and r["decode_step_ms"] > 0
    assert poer["decode_steps"] <= 3 and poer["continuation_max_all"] <= 4 < grpo["decode_steps"]
    assert res["decode_steps_ratio"] == poer["decode_steps"] / grpo["decode_steps"]
    proj = res["projection"]
    assert all(r["poer_decode_bound"] in ("memory", "compute") and r["step_ratio_by_steps"] > 0 for r in proj)
    assert {(r["model"], r["chip"]) for r in proj} == {(m, c) for m in bench_rollout.PROJECT_MODELS
                                                      for c in bench_rollout.PROJECT_CHIPS}
    assert all(0 < r["step_ratio"] < 1 for r in proj + res["projection_paper_tokens"])
    text = capsys.readouterr().out
    assert "decoded tokens" in text and "Projected POER / GRPO step time" in text and "0.074" in text
    assert all(col in text for col in ("decode steps", "cont. p95", "cont. max", "row util.", "ratio by steps"))

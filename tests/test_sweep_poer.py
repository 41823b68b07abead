"""scripts/sweep_poer.py and its sweep_stats.py: the statistics from per-problem results (equal steps, decoded tokens
and time on both clocks, seed spread, paired tests), and a tiny sweep end to end, killed part-way and resumed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from poer_jax.eval.paired import paired_sign_flip_test

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import sweep_poer  # noqa: E402
import sweep_stats  # noqa: E402

from tests.helpers_runs import ARITHMETIC_WARM_START  # noqa: E402


def _run(arm: str, seed: int, strategy: str, decoded: float, step_s: float, evals: list[tuple[int, float]],
         problems: int = 40, seed_rng: int = 0) -> dict:
    """A finished run: constant per-step counts, evaluations whose per-problem accuracies average to ``acc``."""
    rng = np.random.default_rng(seed_rng)
    steps = [{"step": s, "tokens/decoded": decoded, "tokens/prefilled": 100.0, "tokens/trained": 1000.0,
              "rollout/decode_steps": 10 if strategy == "poer" else 40, "time/rollout_s": 0.5,
              "time/update_s": 1.0, "time/step_s": step_s} for s in range(1, evals[-1][0] + 1)]
    out = []
    for step, acc in evals:
        k = round(acc * problems)
        per = np.zeros(problems)
        per[rng.permutation(problems)[:k]] = 1.0
        out.append({"step": step, "accuracy": float(per.mean()), "per_problem": per.tolist()})
    return {"arm": arm, "seed": seed, "strategy": strategy, "steps": steps, "evals": out}


def test_statistics_at_equal_steps_tokens_and_time_come_from_the_per_problem_results():
    ref_evals = [(0, 0.5), (1, 0.55), (2, 0.6), (4, 0.7), (10, 0.8)]
    runs = {"grpo": [_run("grpo", s, "full", 1000.0, 3.0, ref_evals, seed_rng=10 + s) for s in (0, 1)],
            "poer_L4": [_run("poer_L4", s, "poer", 150.0, 2.0, [(0, 0.5), (5, 0.55), (10, 0.65)], seed_rng=20 + s)
                        for s in (0, 1)]}
    rates = {"poer": {"prefill_s_per_token": 1e-3, "decode_s_per_step": 0.01, "host_s": 0.1, "update_s_per_token": 1e-3,
                      "other_s": 0.2},
             "full": {"prefill_s_per_token": 1e-3, "decode_s_per_step": 0.02, "host_s": 0.1, "update_s_per_token": 1e-3,
                      "other_s": 0.2}}
    # priced steps: POER 0.1 + 0.1 + 0.1 + 1.0 + 0.2 = 1.5 s, GRPO 0.1 + 0.8 + 0.1 + 1.0 + 0.2 = 2.2 s
    assert sweep_stats.priced_step_s(runs["poer_L4"][0]["steps"][0], rates["poer"]) == pytest.approx(1.5)
    stats = sweep_stats.compare_arms(runs, rates)
    poer, grpo = stats["arms"]["poer_L4"], stats["arms"]["grpo"]
    accs = [r["evals"][-1]["accuracy"] for r in runs["poer_L4"]]
    assert poer["accuracy_last"] == pytest.approx(np.mean(accs))
    assert poer["accuracy_last_std"] == pytest.approx(np.std(accs, ddof=1))
    v = poer["vs_reference"]

    def paired(ref_step: int) -> tuple[float, float]:
        ref = np.mean([next(e["per_problem"] for e in r["evals"] if e["step"] == ref_step) for r in runs["grpo"]], 0)
        mine = np.mean([r["evals"][-1]["per_problem"] for r in runs["poer_L4"]], axis=0)
        t = paired_sign_flip_test(ref, mine, alternative="two-sided")
        return t.mean_difference, t.p_value

    # equal steps: both at step 10
    assert v["equal_steps"]["reference_steps"] == [10, 10]
    assert (v["equal_steps"]["difference"], v["equal_steps"]["p"]) == pytest.approx(paired(10))
    per_seed = [a["evals"][-1]["accuracy"] - b["evals"][-1]["accuracy"] for a, b in zip(runs["poer_L4"],
                                                                                           runs["grpo"], strict=True)]
    assert v["equal_steps"]["per_seed_difference"] == pytest.approx(per_seed)
    # equal decoded tokens: POER's 10 x 150 = 1500, GRPO's first evaluation at >= 1500 is step 2 (2000)
    tok = v["equal_decoded_tokens"]
    assert tok["budget"] == 1500 and tok["reference_steps"] == [2, 2] and tok["reached"]
    assert (tok["difference"], tok["p"]) == pytest.approx(paired(2))
    grpo_acc = [np.interp(1500, [0, 1000, 2000, 4000, 10000], [e["accuracy"] for e in r["evals"]])
                for r in runs["grpo"]]
    assert tok["reference_accuracy_interpolated"] == pytest.approx(np.mean(grpo_acc))
    # equal time, measured: POER 10 x 2 s = 20 s -> GRPO step 10 (30 s; step 4 is 12 s); priced: 15 s -> step 10
    assert v["equal_time_measured"]["budget"] == 20 and v["equal_time_measured"]["reference_steps"] == [10, 10]
    assert v["equal_time_priced"]["budget"] == pytest.approx(15.0)
    assert stats["clocks"] == ["measured_s", "priced_s"] and grpo["run_priced_s"] == pytest.approx(22.0)
    assert "vs_reference" not in grpo
    start = np.mean([r["evals"][0]["per_problem"] for r in runs["grpo"]], axis=0)
    last = np.mean([r["evals"][-1]["per_problem"] for r in runs["grpo"]], axis=0)
    assert grpo["vs_start_p"] == pytest.approx(paired_sign_flip_test(start, last).p_value)
    md = sweep_poer.table_markdown(stats, {"grpo": "GRPO", "poer_L4": "POER L = 4"})
    assert "POER L = 4" in md and "equal time (priced)" in md and "(GRPO step 2)" in md
    without = sweep_stats.compare_arms(runs, None)
    assert without["clocks"] == ["measured_s"] and "equal_time_priced" not in without["arms"]["poer_L4"]["vs_reference"]


def test_budget_never_reached_is_flagged():
    runs = {"grpo": [_run("grpo", 0, "full", 10.0, 1.0, [(0, 0.5), (2, 0.6)])],
            "poer_L4": [_run("poer_L4", 0, "poer", 100.0, 1.0, [(0, 0.5), (2, 0.6)])]}
    tok = sweep_stats.compare_arms(runs, None)["arms"]["poer_L4"]["vs_reference"]["equal_decoded_tokens"]
    assert not tok["reached"] and tok["reference_steps"] == [2]


@pytest.mark.slow
def test_tiny_sweep_writes_its_outputs_and_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    """Two steps of GRPO and POER on the arithmetic config; the POER run is killed after its first step (after
    its checkpoint), the sweep is run again: GRPO is not rerun, POER resumes at step 1, and the aggregate's
    statistics are those of the runs' per-problem results."""
    from poer_jax.train.loop import PoerTrainer

    out = tmp_path / "sweep"
    argv = [f"--config={ROOT / 'configs' / 'arithmetic.py'}", "--L", "4", "--seeds", "0", "--steps", "2",
            "--eval-steps", "2", "--grpo-eval-steps", "1", "--checkpoint-every", "1", "--out", str(out),
            "--config.toy.num_train=64", "--config.toy.num_test=8", f"--config.warm_start.path={ARITHMETIC_WARM_START}",
            "--config.data.questions_per_step=8", "--config.rollout.group_size=4", "--config.eval.num_samples=2",
            "--config.mesh.num_devices=1"]
    trained: list[str] = []
    real_step = PoerTrainer.train_step

    def killed_after_one(self):
        trained.append(f"{self.cfg.rollout.strategy}@{self.step + 1}")
        if self.cfg.rollout.strategy == "poer" and self.step == 1:
            raise KeyboardInterrupt("killed")
        return real_step(self)

    monkeypatch.setattr(PoerTrainer, "train_step", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        sweep_poer.main(argv)
    assert trained == ["full@1", "full@2", "poer@1", "poer@2"]
    assert (out / "runs" / "grpo_s0.json").is_file() and not (out / "runs" / "poer_L4_s0.json").exists()
    trained.clear()
    monkeypatch.setattr(PoerTrainer, "train_step", lambda self: trained.append(self.step + 1) or real_step(self))
    # --run-arms: this process runs GRPO only (finished: nothing to do) and leaves POER to another process
    assert sweep_poer.main([*argv, "--run-arms", "grpo"]) == 0
    assert trained == [] and "not finished yet: poer_L4_s0" in capsys.readouterr().out
    assert sweep_poer.main([*argv, "--run-arms", "poer_L9"]) == 2
    assert "--run-arms poer_L9: not an arm of this sweep (grpo, poer_L4)" in capsys.readouterr().err
    assert sweep_poer.main(argv) == 0
    assert trained == [2]  # GRPO's finished run kept, POER resumed from its step-1 checkpoint
    assert "resumed at step 1" in capsys.readouterr().out
    poer = json.loads((out / "runs" / "poer_L4_s0.json").read_text())
    grpo = json.loads((out / "runs" / "grpo_s0.json").read_text())
    assert [s["step"] for s in poer["steps"]] == [1, 2] and [e["step"] for e in poer["evals"]] == [0, 2]
    assert [e["step"] for e in grpo["evals"]] == [0, 1, 2]
    assert poer["evals"][0] == grpo["evals"][0]  # one start evaluation per seed
    assert all(len(e["per_problem"]) == 8 for e in poer["evals"] + grpo["evals"])
    for key in ("rollout/decode_steps", "time/prefill_s", "time/decode_s", "tokens/decoded"):
        assert all(key in s for s in poer["steps"] + grpo["steps"])
    res = json.loads((out / "sweep.json").read_text())
    v = res["statistics"]["arms"]["poer_L4"]["vs_reference"]["equal_steps"]
    t = paired_sign_flip_test(grpo["evals"][-1]["per_problem"], poer["evals"][-1]["per_problem"],
                              alternative="two-sided")
    assert (v["difference"], v["p"]) == pytest.approx((t.mean_difference, t.p_value))
    last = np.mean(poer["evals"][-1]["per_problem"])
    assert res["statistics"]["arms"]["poer_L4"]["accuracy_last"] == pytest.approx(last)
    assert "equal decoded tokens" in (out / "sweep_table.md").read_text()
    assert (out / "sweep_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The statistics of ``scripts/sweep_poer.py`` (its docstring says what they are): the two clocks a step is timed on
(``measured``, and ``priced`` at a quiet ``bench_rollout.py`` JSON's rates), and every arm against GRPO at equal steps,
equal decoded tokens and equal time, with paired sign-flip tests over problems (``compare_arms``)."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

REFERENCE = "grpo"


# ---- clocks ---------------------------------------------------------------------------------------------------
def quiet_rates(bench: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per strategy ('poer' / 'full'), the quiet medians a step is priced with (module docstring), from a
    ``bench_rollout.py`` JSON's per-step rows (its first step, which compiles, left out)."""
    rates = {}
    for key, strategy in (("poer", "poer"), ("grpo", "full")):
        steps = bench[key]["per_step"][1:] or bench[key]["per_step"]

        def med(f: Any, steps: list[dict] = steps) -> float:
            return float(statistics.median(f(r) for r in steps))

        rates[strategy] = {
            "prefill_s_per_token": med(lambda r: r["time/prefill_s"] / max(r["tokens/prefilled"], 1)),
            "decode_s_per_step": med(lambda r: r["time/decode_s"] / max(r["rollout/decode_steps"], 1)),
            "host_s": med(lambda r: r["time/rollout_host_s"]),
            "update_s_per_token": med(lambda r: r["time/update_s"] / max(r["tokens/trained"], 1)),
            "other_s": med(lambda r: r["time/step_s"] - r["time/rollout_s"] - r["time/update_s"]),
        }
    return rates


def priced_step_s(row: dict[str, float], rate: dict[str, float]) -> float:
    """A step's time at quiet rates: prefill + decode steps + host + update + the rest."""
    return (row["tokens/prefilled"] * rate["prefill_s_per_token"]
            + row["rollout/decode_steps"] * rate["decode_s_per_step"] + rate["host_s"]
            + row["tokens/trained"] * rate["update_s_per_token"] + rate["other_s"])


def eval_points(run: dict[str, Any], rates: dict[str, dict[str, float]] | None) -> list[dict[str, Any]]:
    """The run's evaluations with the cumulative decoded tokens and training time (each clock) at each."""
    decoded = np.cumsum([0.0] + [r["tokens/decoded"] for r in run["steps"]])
    measured = np.cumsum([0.0] + [r["time/step_s"] for r in run["steps"]])
    priced = (np.cumsum([0.0] + [priced_step_s(r, rates[run["strategy"]]) for r in run["steps"]])
              if rates is not None else None)
    points = []
    for e in run["evals"]:
        p = {"step": e["step"], "accuracy": e["accuracy"], "decoded_tokens": float(decoded[e["step"]]),
             "measured_s": float(measured[e["step"]])}
        if priced is not None:
            p["priced_s"] = float(priced[e["step"]])
        points.append(p)
    return points


# ---- statistics -----------------------------------------------------------------------------------------------
def _interp(evals: list[dict], key: str, x: float) -> float:
    """Accuracy at ``x`` of ``key`` (linear between evaluations, held past the last)."""
    return float(np.interp(x, [e[key] for e in evals], [e["accuracy"] for e in evals]))


def _at_budget(run: dict[str, Any], points: list[dict], key: str, budget: float) -> int:
    """Index of the run's first evaluation with ``key`` >= ``budget`` (its last when it never gets there)."""
    for i, p in enumerate(points):
        if p[key] >= budget:
            return i
    return len(points) - 1


def _paired(reference: list[np.ndarray], other: list[np.ndarray]) -> dict[str, float]:
    """Two-sided paired sign-flip test over problems of per-problem accuracy averaged over the seeds."""
    from poer_jax.eval.paired import paired_sign_flip_test

    t = paired_sign_flip_test(np.mean(reference, axis=0), np.mean(other, axis=0), alternative="two-sided")
    return {"difference": t.mean_difference, "p": t.p_value, "problems": t.n}


def compare_arms(runs: dict[str, list[dict]], rates: dict[str, dict[str, float]] | None,
                 reference: str = REFERENCE) -> dict[str, Any]:
    """Every arm's accuracy (mean / std over seeds) at its start and last step, its paired test against the start,
    and for every arm but ``reference`` the comparisons at equal steps, decoded tokens and time (module
    docstring). ``runs[arm]``: its finished runs, one per seed; arms are compared on the seeds they share."""
    from poer_jax.eval.paired import paired_sign_flip_test

    clocks = ["measured_s"] + (["priced_s"] if rates is not None else [])
    out: dict[str, Any] = {"reference": reference, "clocks": clocks, "arms": {}}
    points = {arm: {r["seed"]: eval_points(r, rates) for r in rs} for arm, rs in runs.items()}
    by_seed = {arm: {r["seed"]: r for r in rs} for arm, rs in runs.items()}
    for arm, rs in runs.items():
        last = [np.asarray(r["evals"][-1]["per_problem"]) for r in rs]
        start = [np.asarray(r["evals"][0]["per_problem"]) for r in rs]
        vs_start = paired_sign_flip_test(np.mean(start, axis=0), np.mean(last, axis=0))
        accs = [r["evals"][-1]["accuracy"] for r in rs]
        timed = [s for r in rs for s in r["steps"][1:]]
        out["arms"][arm] = {
            "seeds": sorted(by_seed[arm]), "strategy": rs[0]["strategy"], "last_step": rs[0]["evals"][-1]["step"],
            "accuracy_start": float(np.mean([r["evals"][0]["accuracy"] for r in rs])),
            "accuracy_last": float(np.mean(accs)), "accuracy_last_std": float(np.std(accs, ddof=1)) if len(accs) > 1
            else 0.0, "accuracy_last_per_seed": accs, "vs_start_p": vs_start.p_value,
            "decoded_tokens_per_step": float(np.mean([s["tokens/decoded"] for r in rs for s in r["steps"]])),
            "decode_steps_per_rollout": float(np.median([s["rollout/decode_steps"] for s in timed])),
            "rollout_s": float(np.median([s["time/rollout_s"] for s in timed])),
            "update_s": float(np.median([s["time/update_s"] for s in timed])),
            "step_s": float(np.median([s["time/step_s"] for s in timed])),
            "run_measured_s": float(np.mean([points[arm][r["seed"]][-1]["measured_s"] for r in rs])),
        }
        if rates is not None:
            out["arms"][arm]["run_priced_s"] = float(np.mean([points[arm][r["seed"]][-1]["priced_s"] for r in rs]))
    if reference not in runs:
        return out
    for arm in runs:
        if arm == reference:
            continue
        seeds = sorted(set(by_seed[arm]) & set(by_seed[reference]))
        if not seeds:
            continue
        mine = [by_seed[arm][s] for s in seeds]
        ref = [by_seed[reference][s] for s in seeds]
        cmp: dict[str, Any] = {"seeds": seeds}

        def point(ref_idx: list[int], budget: list[float] | None, key: str | None, mine=mine, ref=ref,
                  seeds=seeds) -> dict[str, Any]:
            my_acc = [r["evals"][-1]["accuracy"] for r in mine]
            ref_acc = [r["evals"][i]["accuracy"] for r, i in zip(ref, ref_idx, strict=True)]
            diffs = [a - b for a, b in zip(my_acc, ref_acc, strict=True)]
            res = {"reference_steps": [r["evals"][i]["step"] for r, i in zip(ref, ref_idx, strict=True)],
                   "accuracy": float(np.mean(my_acc)), "reference_accuracy": float(np.mean(ref_acc)),
                   "per_seed_difference": diffs, "difference_std": float(np.std(diffs, ddof=1)) if len(diffs) > 1
                   else 0.0,
                   **_paired([np.asarray(r["evals"][i]["per_problem"]) for r, i in zip(ref, ref_idx, strict=True)],
                             [np.asarray(r["evals"][-1]["per_problem"]) for r in mine])}
            if budget is not None and key is not None:
                ref_pts = [points[reference][s] for s in seeds]
                res["budget"] = float(np.mean(budget))
                res["reached"] = all(p[i][key] >= b for p, i, b in zip(ref_pts, ref_idx, budget, strict=True))
                res["reference_accuracy_interpolated"] = float(np.mean(
                    [_interp(p, key, b) for p, b in zip(ref_pts, budget, strict=True)]))
            return res

        last_step = mine[0]["evals"][-1]["step"]
        ref_idx = [next((i for i, e in enumerate(r["evals"]) if e["step"] == last_step), len(r["evals"]) - 1)
                   for r in ref]
        cmp["equal_steps"] = point(ref_idx, None, None)
        for key, name in (("decoded_tokens", "equal_decoded_tokens"), *((c, f"equal_time_{c[:-2]}") for c in clocks)):
            budget = [points[arm][s][-1][key] for s in seeds]
            idx = [_at_budget(by_seed[reference][s], points[reference][s], key, b)
                   for s, b in zip(seeds, budget, strict=True)]
            cmp[name] = point(idx, budget, key)
        out["arms"][arm]["vs_reference"] = cmp
    return out


# ---- report ---------------------------------------------------------------------------------------------------

"""The paired test over problems (demo and sweep verdicts) and the step-time projection (bench_rollout)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from poer_jax.eval.paired import paired_sign_flip_test
from poer_jax.model import preset
from poer_jax.model.presets import PRESET_PARAM_COUNTS
from poer_jax.plan.projection import (
    H20,
    Layout,
    ModelCost,
    StepTokens,
    decode_by_steps,
    get_chip,
    project_ratio,
    step_seconds,
)
from poer_jax.plan.targets import CHIPS


def _exact_p(d: np.ndarray, alternative: str) -> float:
    """Every one of the 2^n sign vectors: the exact randomisation p-value."""
    obs, hits = d.mean(), 0
    flips = [np.asarray(s) @ d / d.size for s in itertools.product((-1.0, 1.0), repeat=d.size)]
    for f in flips:
        hits += f >= obs - 1e-12 if alternative == "greater" else abs(f) >= abs(obs) - 1e-12
    return hits / len(flips)


def test_sign_flip_test_matches_exact_enumeration_and_its_edge_cases():
    rng = np.random.default_rng(0)
    before = rng.random((10, 4)) < 0.4
    after = rng.random((10, 4)) < 0.7
    d = after.mean(1) - before.mean(1)
    for alt in ("greater", "two-sided"):
        t = paired_sign_flip_test(before, after, alternative=alt, resamples=200_000, seed=1)
        assert t.p_value == pytest.approx(_exact_p(d, alt), abs=0.005)
    assert t.before == pytest.approx(before.mean()) and t.after == pytest.approx(after.mean()) and t.n == 10
    same = paired_sign_flip_test(before, before)
    assert same.p_value == 1.0 and same.mean_difference == 0.0
    big = paired_sign_flip_test(np.zeros(60), np.ones(60), resamples=10_000)
    assert big.p_value == pytest.approx(1 / 10_001)  # none of the flips reaches the observed difference
    assert paired_sign_flip_test(np.ones(60), np.zeros(60), alternative="less", resamples=10_000).p_value < 1e-3
    assert "p = " in big.summary()
    with pytest.raises(ValueError, match="same problems"):
        paired_sign_flip_test(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="alternative"):
        paired_sign_flip_test(np.zeros(3), np.zeros(3), alternative="bigger")


def test_model_cost_counts_the_real_models_parameters():
    for name in ("r1-distill-qwen-1.5b", "r1-distill-qwen-7b"):
        cfg = preset(name)
        m = ModelCost.from_config(cfg, name)
        # weights = matmuls + input embedding (norms and biases are < 0.1 %)
        assert m.weight_bytes / 2 == pytest.approx(PRESET_PARAM_COUNTS[name], rel=1e-3)
        assert m.kv_bytes_per_token == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2


def _tokens(decoded: float, prefilled: float = 1e4) -> StepTokens:
    return StepTokens(samples=96, prefilled=prefilled, decoded=decoded, trained=96 * 400.0, prefill_context=100,
                      decode_context=300, train_context=200)


def test_step_seconds_follow_the_roofline_formulas():
    m = ModelCost(name="toy", matmul_params=1e9, attn_flops_per_pair=1e5, weight_bytes=2e9, kv_bytes_per_token=1e5)
    chip = CHIPS["h100-80gb"]
    lay = Layout(rollout_chips=2, train_chips=4, max_decode_batch=16, logprob_passes=1, remat=False)
    t = step_seconds(_tokens(5000.0), m, chip, lay)
    assert t["prefill"] == pytest.approx(1e4 * (2e9 + 1e5 * 100) / (chip.peak_flops * 2))
    batch = 16  # min(max_decode_batch, 96 samples / 2 chips)
    per_tok = max((2e9 + 1e5 * 300) / chip.peak_flops, (2e9 / batch + 300 * 1e5) / chip.bandwidth)
    assert t["decode"] == pytest.approx(5000 / 2 * per_tok)
    fwd = 2e9 + 1e5 * 200
    assert t["update"] == pytest.approx(96 * 400 * (3 * fwd + fwd) / (chip.peak_flops * 4))
    assert t["step"] == pytest.approx(t["prefill"] + t["decode"] + t["update"])
    # decoding a sample of a small batch is bandwidth-bound: half the decoded tokens, half the decode time
    assert step_seconds(_tokens(2500.0), m, chip, lay)["decode"] == pytest.approx(t["decode"] / 2)


def test_projected_ratio_of_fewer_decoded_tokens():
    models = {"1.5b": ModelCost.from_config(preset("r1-distill-qwen-1.5b"))}
    layouts = {"dp": Layout(8, 8), "paper": Layout(1, 8)}
    grpo, poer = _tokens(96 * 2700.0, prefilled=16 * 250.0), _tokens(96 * 146.0, prefilled=16 * 2800.0)
    rows = {r["layout"]: r for r in project_ratio(poer, grpo, models, {"h100": "h100-80gb"}, layouts)}
    assert 0 < rows["dp"]["step_ratio"] < 1 and rows["dp"]["rollout_ratio"] < 0.2
    # one sampling chip makes the rollout a larger share of GRPO's step
    assert rows["paper"]["grpo_rollout_share"] > rows["dp"]["grpo_rollout_share"]
    assert get_chip("h20") is H20 and get_chip("tpu-v5p") is CHIPS["tpu-v5p"]
    with pytest.raises(KeyError, match="unknown chip"):
        get_chip("a100")
    same = project_ratio(grpo, grpo, models, {"h100": "h100-80gb"}, layouts)
    assert all(r["step_ratio"] == pytest.approx(1.0) for r in same)


def test_decode_priced_by_steps_matches_a_hand_computation():
    """Decode by steps: S steps per chip, r = decoded / (chips x S) live rows a step, a step the larger of
    r x F_dec / peak and (W + r c k) / bandwidth; the bound named; equal to the token price at full rows."""
    import dataclasses

    m = ModelCost(name="toy", matmul_params=1e9, attn_flops_per_pair=1e5, weight_bytes=2e9, kv_bytes_per_token=1e5)
    chip = CHIPS["h100-80gb"]
    lay = Layout(rollout_chips=2, train_chips=2, max_decode_batch=32)
    # 96 samples on 2 chips: 48 rows a chip, over the 32-row decode batch: two waves of the 50 measured steps
    tail = dataclasses.replace(_tokens(decoded=2400.0), decode_steps=50)
    d = decode_by_steps(tail, m, chip, lay)
    steps, live = 100, 2400 / 2 / 100  # 12 live rows a step (a tail: few rows still decoding)
    flops = live * (2e9 + 1e5 * 300) / chip.peak_flops
    mem = (2e9 + live * 300 * 1e5) / chip.bandwidth
    assert d.steps == steps and d.live_rows == pytest.approx(live) and mem > flops and d.bound == "memory"
    assert d.seconds == pytest.approx(steps * mem) and d.step_s == pytest.approx(mem)
    t = step_seconds(tail, m, chip, lay)
    assert t["decode_by_steps"] == pytest.approx(d.seconds) and t["decode_memory_bound"] == 1.0
    assert t["step_by_steps"] == pytest.approx(t["prefill"] + d.seconds + t["update"])
    assert t["decode_by_steps"] > 2 * t["decode"]  # the tail reads the weights on steps that make few tokens
    # every row of every step makes a token (32 rows a chip, one wave, 50 steps): the per-token price
    full = dataclasses.replace(tail, samples=64.0, decoded=2 * 32 * 50.0)
    priced = step_seconds(full, m, chip, lay)
    assert priced["decode_by_steps"] == pytest.approx(priced["decode"])
    # a model of many FLOPs and few bytes: compute-bound
    heavy = ModelCost(name="heavy", matmul_params=1e12, attn_flops_per_pair=0.0, weight_bytes=1e9,
                      kv_bytes_per_token=0.0)
    dh = decode_by_steps(full, heavy, chip, lay)
    assert dh.bound == "compute" and dh.step_s == pytest.approx(32 * 2e12 / chip.peak_flops)
    with pytest.raises(ValueError, match="decode_steps > 0"):
        decode_by_steps(_tokens(1.0), m, chip, lay)
    models = {"toy": m}
    row = project_ratio(tail, dataclasses.replace(tail, decoded=9600.0, decode_steps=200), models,
                        {"h100": chip}, {"l": lay})[0]
    assert row["grpo_decode_bound"] == row["poer_decode_bound"] == "memory"
    assert row["step_ratio_by_steps"] == pytest.approx(row["poer_step_by_steps_s"] / row["grpo_step_by_steps_s"])
    assert "step_ratio_by_steps" not in project_ratio(_tokens(1.0), _tokens(2.0), models, {"h100": chip}, {"l": lay})[0]

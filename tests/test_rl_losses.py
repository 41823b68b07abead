"""poer_jax.rl.losses against a plain per-token numpy/python reference (Eq. 5-7, DAPO, Dr. GRPO)."""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poer_jax.rl.advantages import group_advantages
from poer_jax.rl.losses import (
    AGGREGATIONS,
    LossConfig,
    LossTerms,
    accumulate,
    completion_mask,
    compute_loss,
    finalize,
    get_loss_config,
    get_loss_fn,
)

MAX_LEN = 11


def reference_loss(logp, old, ref, adv, mask, cfg: LossConfig, entropy=None):
    """Loop-per-token reference of the loss value and the metrics (no vectorisation, no JAX)."""
    B, T = logp.shape
    row_sums, row_counts = np.zeros(B), np.zeros(B)
    counts = {"low": 0, "high": 0, "region": 0, "dual": 0}
    kl_sum = ent_sum = ratio_sum = 0.0
    ratios = []
    for b in range(B):
        a = float(adv[b])
        for t in range(T):
            if not mask[b, t]:
                continue
            r = math.exp(logp[b, t] - (logp[b, t] if old is None else old[b, t]))
            ratios.append(r)
            ratio_sum += r
            if cfg.objective == "ppo_clip":
                clipped = min(max(r, 1 - cfg.epsilon_low), 1 + cfg.epsilon_high)
                o = min(r * a, clipped * a)
                low, high = r < 1 - cfg.epsilon_low and a < 0, r > 1 + cfg.epsilon_high and a > 0
                counts["low"] += low
                counts["high"] += high
                counts["region"] += low or high
                if cfg.dual_clip is not None and a < 0 and o < cfg.dual_clip * a:
                    o = cfg.dual_clip * a
                    counts["dual"] += 1
            else:
                o = a
            loss = -o
            if ref is not None:
                d = ref[b, t] - logp[b, t]
                kl = math.exp(d) - d - 1
                kl_sum += kl
                loss += cfg.beta * kl
            if entropy is not None:
                ent_sum += entropy[b, t]
            row_sums[b] += loss
            row_counts[b] += 1
    n = row_counts.sum()
    if cfg.aggregation == "token_mean":
        value = row_sums.sum() / n if n else 0.0
    elif cfg.aggregation == "seq_mean_token_mean":
        rows = [s / c for s, c in zip(row_sums, row_counts, strict=True) if c > 0]
        value = sum(rows) / len(rows) if rows else 0.0
    else:
        value = row_sums.sum() / (B * cfg.max_completion_len)
    metrics = {"ratio/mean": ratio_sum / n if n else 0.0}
    metrics["ratio/max"] = max(ratios) if ratios else 0.0
    metrics["ratio/min"] = min(ratios) if ratios else 0.0
    if cfg.objective == "ppo_clip":
        for k in ("low", "high", "region"):
            metrics[f"clip_ratio/{k}_mean"] = counts[k] / n if n else 0.0
        if cfg.dual_clip is not None:
            metrics["clip_ratio/dual_mean"] = counts["dual"] / n if n else 0.0
    if ref is not None:
        metrics["kl"] = kl_sum / n if n else 0.0
    if entropy is not None:
        metrics["entropy"] = ent_sum / n if n else 0.0
    return value, metrics


def make_inputs(seed: int, B: int = 8, T: int = 9, G: int = 4):
    """Random float64 inputs; row 1 fully masked, a zero-spread group, NaN/inf at masked positions."""
    rng = np.random.default_rng(seed)
    logp = -np.abs(rng.normal(1.0, 0.7, (B, T)))
    old = logp + rng.normal(0.0, 0.35, (B, T))  # ratios well outside [0.8, 1.28] in both directions
    ref = logp + rng.normal(0.0, 0.3, (B, T))
    entropy = np.abs(rng.normal(1.0, 0.5, (B, T)))
    mask = rng.random((B, T)) < 0.7
    mask[1] = False
    mask[2] = True
    rewards = rng.integers(0, 2, B).astype(np.float64)
    rewards[G : 2 * G] = 1.0  # second group: no spread -> zero advantages
    adv = np.array(group_advantages(jnp.asarray(rewards), G), np.float64)
    adv[0] = 3.0  # a large positive and a large negative advantage exercise every clip branch
    adv[3] = -2.0
    old[3, 2] = logp[3, 2] - 1.5  # ratio e^1.5 > dual clip 2.5 with A < 0
    mask[3, 2] = True
    garbage = np.where(rng.random((B, T)) < 0.5, np.nan, -np.inf)
    dirty = [np.where(mask, x, garbage) for x in (logp, old, ref, entropy)]
    return dict(logp=logp, old=old, ref=ref, entropy=entropy, mask=mask, adv=adv, dirty=dirty)


CONFIGS = [
    LossConfig(
        objective=obj,
        epsilon_low=0.2,
        epsilon_high=eh,
        dual_clip=dual,
        beta=beta,
        aggregation=agg,
        max_completion_len=MAX_LEN if agg == "dr_grpo" else None,
    )
    for obj, agg, dual, beta, eh in itertools.product(
        ("ppo_clip", "vanilla_pg"), AGGREGATIONS, (None, 2.5), (0.0, 0.04), (0.28,)
    )
    if not (obj == "vanilla_pg" and dual is not None)
]


def _ids(cfg: LossConfig) -> str:
    return f"{cfg.objective}-{cfg.aggregation}-dual{cfg.dual_clip}-beta{cfg.beta}"


def _check(got: dict, want: dict, atol: float) -> None:
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(float(got[k]), want[k], rtol=0, atol=atol, err_msg=k)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_loss_matches_numpy_reference_x64(cfg: LossConfig) -> None:
    x = make_inputs(0)
    dl, do, dr, de = x["dirty"]
    with jax.enable_x64(True):
        terms = compute_loss(
            jnp.asarray(dl),
            jnp.asarray(do),
            jnp.asarray(dr),
            jnp.asarray(x["adv"]),
            jnp.asarray(x["mask"]),
            cfg,
            entropy=jnp.asarray(de),
        )
        assert terms.loss_sum.dtype == jnp.float64
        loss, metrics = finalize(terms)
    want_loss, want_metrics = reference_loss(
        x["logp"], x["old"], x["ref"], x["adv"], x["mask"], cfg, x["entropy"]
    )
    assert abs(float(loss) - want_loss) <= 1e-9
    _check(metrics, want_metrics, 1e-9)
    if cfg.objective == "ppo_clip":
        # The inputs really exercise the clip branches being compared.
        assert want_metrics["clip_ratio/low_mean"] > 0 and want_metrics["clip_ratio/high_mean"] > 0
        if cfg.dual_clip is not None:
            assert want_metrics["clip_ratio/dual_mean"] > 0


@pytest.mark.parametrize("name", ["grpo", "dapo", "poer_code"])
def test_presets_jit_fp32_and_optional_inputs(name: str) -> None:
    """fp32 under jit, no ref (beta 0) / no old log-probs (on-policy), tolerance 1e-5."""
    x = make_inputs(1)
    dl, do, _, _ = x["dirty"]
    fn = jax.jit(get_loss_fn(name, beta=0.0))
    cfg = get_loss_config(name, beta=0.0)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    for old_in, old_np in ((f32(do), x["old"]), (None, None)):
        loss, metrics = finalize(fn(f32(dl), old_in, None, f32(x["adv"]), jnp.asarray(x["mask"])))
        want_loss, want_metrics = reference_loss(x["logp"], old_np, None, x["adv"], x["mask"], cfg)
        assert abs(float(loss) - want_loss) <= 1e-5
        _check(metrics, want_metrics, 1e-5)
        if old_in is None:
            assert float(metrics["ratio/max"]) == 1.0 and float(metrics["ratio/min"]) == 1.0


def _split_terms(fn, x, bounds):
    dl, do, dr, de = (jnp.asarray(a) for a in x["dirty"])
    adv, mask = jnp.asarray(x["adv"]), jnp.asarray(x["mask"])
    parts = [fn(dl[a:b], do[a:b], dr[a:b], adv[a:b], mask[a:b], entropy=de[a:b]) for a, b in bounds]
    total = parts[0]
    for p in parts[1:]:
        total = accumulate(total, p)
    return total


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_microbatch_accumulation_is_exact(agg: str) -> None:
    """k micro-batch splits (uneven; one holding only the all-masked row) give the full-batch loss and
    metrics, and summed grad(loss_sum) / summed loss_denom gives the full-batch gradient."""
    x = make_inputs(2, B=9, G=3)
    cfg = LossConfig(epsilon_high=0.28, dual_clip=3.0, beta=0.04, aggregation=agg, max_completion_len=MAX_LEN)
    fn = functools.partial(jax.jit(compute_loss, static_argnames="cfg"), cfg=cfg)
    even = [(0, 3), (3, 6), (6, 9)]
    with jax.enable_x64(True):
        full = finalize(_split_terms(fn, x, [(0, 9)]))
        for bounds in ([(0, 1), (1, 2), (2, 9)], even):
            split = finalize(_split_terms(fn, x, bounds))
            assert abs(float(split[0]) - float(full[0])) <= 1e-12
            _check(split[1], {k: float(v) for k, v in full[1].items()}, 1e-12)

        dl, do, dr, _ = (jnp.asarray(a) for a in x["dirty"])
        adv, mask = jnp.asarray(x["adv"]), jnp.asarray(x["mask"])

        @jax.jit
        def sum_grad(lp, old, ref, a, m):
            return jax.value_and_grad(
                lambda p: (lambda t: (t.loss_sum, t))(fn(p, old, ref, a, m)), has_aux=True
            )(lp)

        g_full = jax.jit(jax.grad(lambda lp: finalize(fn(lp, do, dr, adv, mask))[0]))(dl)
        outs = [sum_grad(dl[a:b], do[a:b], dr[a:b], adv[a:b], mask[a:b]) for a, b in even]
        denom = sum(terms.loss_denom for (_, terms), _ in outs)
        g_acc = jnp.concatenate([g for _, g in outs]) / denom
    assert np.all(np.isfinite(np.asarray(g_full)))
    assert np.all(np.asarray(g_full)[~x["mask"]] == 0)  # no gradient leaks into padding garbage
    np.testing.assert_allclose(np.asarray(g_acc), np.asarray(g_full), rtol=0, atol=1e-12)


def test_gradient_matches_analytic_reference() -> None:
    """d loss / d logp per token for ppo_clip + k3 KL with token_mean: -A r [unclipped branch active]
    + beta (1 - exp(ref - logp)), divided by the token count."""
    x = make_inputs(3)
    cfg = LossConfig(epsilon_high=0.28, beta=0.04, aggregation="token_mean")
    with jax.enable_x64(True):
        dl, do, dr, _ = (jnp.asarray(a) for a in x["dirty"])
        g = jax.grad(lambda lp: finalize(compute_loss(lp, do, dr, jnp.asarray(x["adv"]), x["mask"], cfg))[0])(
            dl
        )
    logp, old, ref, adv, mask = x["logp"], x["old"], x["ref"], x["adv"], x["mask"]
    want = np.zeros_like(logp)
    n = mask.sum()
    for b, t in zip(*np.nonzero(mask), strict=True):
        r = math.exp(logp[b, t] - old[b, t])
        a = adv[b]
        clipped = min(max(r, 0.8), 1.28)
        # Inside the clip range both branches are r A; outside, only a strictly smaller r A carries gradient.
        pg = -a * r if (r == clipped or r * a < clipped * a) else 0.0
        want[b, t] = (pg + cfg.beta * (1 - math.exp(ref[b, t] - logp[b, t]))) / n
    np.testing.assert_allclose(np.asarray(g), want, rtol=0, atol=1e-12)


def test_all_masked_batch_gives_zeros_not_nan() -> None:
    B, T = 3, 4
    nan = jnp.full((B, T), jnp.nan)

    @functools.partial(jax.jit, static_argnames="cfg")
    def value_and_grad(lp, cfg):
        def f(p):
            loss, metrics = finalize(
                compute_loss(p, nan, nan, jnp.ones(B), jnp.zeros((B, T)), cfg, entropy=nan)
            )
            return loss, metrics

        return jax.value_and_grad(f, has_aux=True)(lp)

    for agg in AGGREGATIONS:
        cfg = LossConfig(beta=0.1, aggregation=agg, max_completion_len=T, dual_clip=2.0)
        (loss, metrics), g = value_and_grad(nan, cfg)
        assert float(loss) == 0.0
        assert all(float(v) == 0.0 for v in metrics.values()), metrics
        assert np.all(np.asarray(g) == 0)


def test_zero_advantages_give_only_kl() -> None:
    """Zero-spread groups (and G = 1) have A = 0: the policy term vanishes, only beta * KL is left."""
    x = make_inputs(4)
    adv = jnp.asarray(group_advantages(jnp.ones(8), 1))
    assert np.all(np.asarray(adv) == 0)
    cfg = LossConfig(beta=0.5, aggregation="token_mean")
    with jax.enable_x64(True):
        loss, metrics = finalize(compute_loss(*(jnp.asarray(a) for a in x["dirty"][:3]), adv, x["mask"], cfg))
        assert abs(float(loss) - 0.5 * float(metrics["kl"])) <= 1e-12
        assert float(metrics["clip_ratio/region_mean"]) == 0.0


def test_completion_mask_matches_loop() -> None:
    start = np.array([0, 3, 5, 2, 7])
    end = np.array([4, 3, 9, 1, 9])
    got = np.asarray(completion_mask(jnp.asarray(start), jnp.asarray(end), 8))
    want = np.array([[s <= t < e for t in range(8)] for s, e in zip(start, end, strict=True)])
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="start and end"):
        completion_mask(jnp.zeros(3, int), jnp.zeros(2, int), 8)


def test_loss_terms_is_a_pytree() -> None:
    x = make_inputs(5)
    terms = jax.jit(get_loss_fn("dapo"))(*(jnp.asarray(a) for a in x["dirty"][:2]), None, x["adv"], x["mask"])
    assert isinstance(terms, LossTerms)
    leaves = jax.tree.leaves(terms)
    assert len(leaves) == 2 + 2 * len(terms.metrics_sums) + 2 + 1


def test_bad_input_errors() -> None:
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="needs ref_logp"):
        compute_loss(z, z, None, jnp.zeros(2), z, LossConfig(beta=0.1))
    with pytest.raises(ValueError, match="advantages has shape"):
        compute_loss(z, z, None, jnp.zeros(3), z, LossConfig())
    with pytest.raises(ValueError, match="mask has shape"):
        compute_loss(z, z, None, jnp.zeros(2), jnp.zeros((2, 4)), LossConfig())
    with pytest.raises(ValueError, match="max_completion_len"):
        get_loss_config("dr_grpo")
    with pytest.raises(ValueError, match="dual_clip"):
        LossConfig(dual_clip=1.0)
    with pytest.raises(ValueError, match="aggregation"):
        LossConfig(aggregation="mean")
    with pytest.raises(ValueError, match="unknown loss preset"):
        get_loss_fn("ppo2")
    with pytest.raises(ValueError, match="unknown LossConfig fields"):
        get_loss_config("dapo", eps=0.1)
    assert get_loss_config("dr_grpo", max_completion_len=64).max_completion_len == 64

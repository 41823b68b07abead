"""Advantages (Eq. 6), length-aware reward (Eq. 10), DAPO overlong shaping and dynamic sampling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poer_jax.poer.length_reward import length_aware_reward
from poer_jax.rl.advantages import group_advantages, group_mean_std
from poer_jax.rl.dynamic_sampling import (
    DynamicSampler,
    DynamicSamplingError,
    groups_with_spread,
    select_groups,
)
from poer_jax.rl.reward_shaping import apply_overlong_penalty, overlong_penalty

# ----------------------------------------------------------------------------------------- advantages

# Jitted once per static configuration: much faster on CPU than eager op-by-op dispatch.
_adv = jax.jit(group_advantages, static_argnames=("group_size", "scale", "eps", "ddof"))
_mean_std = jax.jit(group_mean_std, static_argnames=("group_size", "ddof"))


def reference_advantages(rewards, G, scale, eps, ddof, valid=None):
    """TRL's formula, one group at a time in numpy (std defined as 0 when fewer than ddof + 1 entries)."""
    r = np.asarray(rewards, np.float64).reshape(-1, G)
    v = np.ones_like(r, bool) if valid is None else np.asarray(valid).reshape(-1, G)

    def std(x):
        return float(np.std(x, ddof=ddof)) if x.size > ddof else 0.0

    batch_std = std(r[v])
    out = np.zeros_like(r)
    for g in range(r.shape[0]):
        vals = r[g][v[g]]
        if vals.size == 0:
            continue
        centered = vals - vals.mean()
        s = {"group": std(vals), "batch": batch_std, "none": None}[scale]
        out[g][v[g]] = centered if s is None else centered / (s + eps)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("ddof", [0, 1])
def test_advantages_match_reference(scale: str, ddof: int) -> None:
    rng = np.random.default_rng(0)
    G = 6
    rewards = rng.integers(0, 3, (5, G)).astype(np.float64) * 0.5
    rewards[1] = 1.0  # zero spread
    rewards[3, :3] = 0.0
    valid = rng.random((5, G)) < 0.8
    valid[4] = False  # an all-padding group
    valid[2, 1:] = False  # a group with one valid response
    with jax.enable_x64(True):
        flat = _adv(jnp.asarray(rewards.reshape(-1)), G, scale=scale, ddof=ddof)
        grid = _adv(jnp.asarray(rewards), scale=scale, ddof=ddof)
        masked = _adv(jnp.asarray(rewards), scale=scale, ddof=ddof, valid=jnp.asarray(valid))
    assert flat.shape == (5 * G,) and grid.shape == (5, G)
    want = reference_advantages(rewards, G, scale, 1e-4, ddof)
    np.testing.assert_allclose(np.asarray(flat).reshape(5, G), want, rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.asarray(grid), want, rtol=0, atol=1e-10)
    want_masked = reference_advantages(rewards, G, scale, 1e-4, ddof, valid)
    np.testing.assert_allclose(np.asarray(masked), want_masked, rtol=0, atol=1e-10)
    assert np.all(np.asarray(grid)[1] == 0)  # zero-spread group -> exactly 0


def test_trl_default_hand_values() -> None:
    # Group [1, 0, 0]: mean 1/3, unbiased std sqrt(1/3); A = (2/3) / (sqrt(1/3) + 1e-4), (-1/3) / (...).
    adv = np.asarray(_adv(jnp.array([1.0, 0.0, 0.0]), 3))
    s = math.sqrt(1 / 3) + 1e-4
    np.testing.assert_allclose(adv, [(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s], rtol=1e-6)


def test_group_size_one_and_eps_zero_give_zero_not_nan() -> None:
    for scale in ("group", "batch", "none"):
        adv = _adv(jnp.array([0.3, 1.0, 0.0]), 1, scale=scale)
        assert np.all(np.asarray(adv) == 0)
    adv = _adv(jnp.array([[1.0, 1.0], [0.0, 1.0]]), eps=0.0)
    assert np.all(np.isfinite(np.asarray(adv)))
    np.testing.assert_allclose(np.asarray(adv), [[0, 0], [-1 / math.sqrt(2), 1 / math.sqrt(2)]], rtol=1e-6)
    mean, std = _mean_std(jnp.array([2.0, 4.0]), 1)
    np.testing.assert_array_equal(np.asarray(mean), [2.0, 4.0])
    np.testing.assert_array_equal(np.asarray(std), [0.0, 0.0])


def test_advantages_jit_and_errors() -> None:
    fn = jax.jit(lambda r: group_advantages(r, 4))
    r = jnp.arange(8.0)
    np.testing.assert_allclose(np.asarray(fn(r)), np.asarray(group_advantages(r, 4)), rtol=1e-6)
    with pytest.raises(ValueError, match="not a multiple of group_size=3"):
        _adv(jnp.zeros(8), 3)
    with pytest.raises(ValueError, match="needs group_size"):
        _adv(jnp.zeros(8))
    with pytest.raises(ValueError, match="scale must be one of"):
        _adv(jnp.zeros((2, 4)), scale="global")
    with pytest.raises(ValueError, match="ddof"):
        _adv(jnp.zeros((2, 4)), ddof=2)


# ------------------------------------------------------------------------------------ length reward

SIG1 = 0.7310585786300049  # 1 / (1 + e^-1)
SIG_HALF = 0.6224593312018546  # 1 / (1 + e^-0.5)


def test_length_reward_paper_hand_values() -> None:
    # Group 0: lengths 100, 200, 300 -> l_ref 200. Correct short: 1 * sigmoid(0.01 * 100) = SIG1.
    # Correct at the mean: 0.5. Incorrect (r = 0): 0, clipped up to m = 0.5.
    # Group 1: lengths 100, 300 -> l_ref 200; r = 2 gives 2 * SIG1 = 1.46 -> clipped to M = 1; r = 1 at
    # length 300 gives sigmoid(-1) = 0.269 -> clipped to 0.5.
    rewards = jnp.array([[1.0, 1.0, 0.0], [2.0, 1.0, 1.0]])
    lengths = jnp.array([[100, 200, 300], [100, 300, 200]])
    got = np.asarray(length_aware_reward(rewards, lengths))
    np.testing.assert_allclose(got, [[SIG1, 0.5, 0.5], [1.0, 0.5, 0.5]], rtol=0, atol=1e-6)
    # Looser bounds show the unclipped value.
    got = np.asarray(length_aware_reward(rewards, lengths, r_min=0.0, r_max=2.0))
    np.testing.assert_allclose(got[1], [2 * SIG1, 1 - SIG1, 0.5], rtol=0, atol=1e-6)


def test_length_reward_correct_only_hand_values() -> None:
    # Group 0: correct lengths 100, 200 -> l_ref 150; sigmoid(0.5) and sigmoid(-0.5) = 0.378 -> 0.5;
    # the incorrect answer keeps r = 0 (and its length 900 does not move l_ref).
    # Group 1: nothing correct -> unchanged, including a negative reward.
    # Group 2: explicit `correct` mask: r = 0.2 counted incorrect stays 0.2.
    rewards = jnp.array([[1.0, 1.0, 0.0], [0.0, -0.5, 0.0], [1.0, 0.2, 1.0]])
    lengths = jnp.array([[100, 200, 900], [10, 20, 30], [200, 50, 200]])
    got = np.asarray(length_aware_reward(rewards, lengths, variant="correct_only"))
    np.testing.assert_allclose(got[:2], [[SIG_HALF, 0.5, 0.0], [0.0, -0.5, 0.0]], rtol=0, atol=1e-6)
    correct = jnp.array([[True, True, False]] * 2 + [[True, False, True]])
    got = np.asarray(length_aware_reward(rewards, lengths, variant="correct_only", correct=correct))
    np.testing.assert_allclose(got[2], [0.5, 0.2, 0.5], rtol=0, atol=1e-6)


def reference_length_reward(r, lens, alpha, lo, hi, variant):
    out = np.array(r, np.float64)
    for g in range(r.shape[0]):
        idx = [i for i in range(r.shape[1]) if variant == "paper" or r[g, i] > 0]
        if not idx:
            continue
        l_ref = sum(lens[g, i] for i in idx) / len(idx)
        for i in idx:
            out[g, i] = min(max(r[g, i] / (1 + math.exp(-alpha * (l_ref - lens[g, i]))), lo), hi)
    return out


@pytest.mark.parametrize("variant", ["paper", "correct_only"])
def test_length_reward_matches_reference(variant: str) -> None:
    rng = np.random.default_rng(1)
    r = rng.integers(0, 2, (6, 5)).astype(np.float64) * rng.choice([1.0, 1.5], (6, 5))
    lens = rng.integers(1, 800, (6, 5))
    with jax.enable_x64(True):
        got = jax.jit(lambda a, b: length_aware_reward(a, b, alpha=0.02, r_min=0.4, variant=variant))(
            jnp.asarray(r), jnp.asarray(lens)
        )
    want = reference_length_reward(r, lens, 0.02, 0.4, 1.0, variant)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-10)


def test_length_reward_errors() -> None:
    with pytest.raises(ValueError, match="variant"):
        length_aware_reward(jnp.zeros((1, 2)), jnp.zeros((1, 2)), variant="code")
    with pytest.raises(ValueError, match="num_groups, G"):
        length_aware_reward(jnp.zeros(4), jnp.zeros(4))
    with pytest.raises(ValueError, match="r_min"):
        length_aware_reward(jnp.zeros((1, 2)), jnp.zeros((1, 2)), r_min=2.0)


# ------------------------------------------------------------------------------------- DAPO overlong


def test_overlong_penalty_hand_values() -> None:
    # max_len 100, buffer 20: free up to 80 tokens, then -1/20 per token, -1 at 100 (x penalty_factor).
    lengths = jnp.array([50, 80, 90, 100, 110])
    np.testing.assert_allclose(
        np.asarray(overlong_penalty(lengths, max_len=100, buffer_len=20)), [0, 0, -0.5, -1.0, -1.5], atol=1e-7
    )
    got = apply_overlong_penalty(
        jnp.array([1.0, 0.0, 1.0, 1.0, 0.0]), lengths, max_len=100, buffer_len=20, penalty_factor=0.5
    )
    np.testing.assert_allclose(np.asarray(got), [1.0, 0.0, 0.75, 0.5, -0.75], atol=1e-7)
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lengths, max_len=100, buffer_len=0)
    with pytest.raises(ValueError, match="same shape"):
        apply_overlong_penalty(jnp.zeros(3), lengths, max_len=100, buffer_len=20)


# ------------------------------------------------------------------------------------- dynamic sampling


def test_groups_with_spread() -> None:
    # np.std([0.1] * 3) is 1.4e-17, not 0: equal rewards must still count as no spread.
    r = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.1], [0.0, 0.0, 0.5]])
    assert np.std(r[2]) > 0
    np.testing.assert_array_equal(groups_with_spread(r), [False, True, False, True])
    with pytest.raises(ValueError, match="NaN rewards in group rows \\[1\\]"):
        groups_with_spread(np.array([[0.0, 1.0], [np.nan, 1.0]]))


def _batch(start: int, rewards: np.ndarray) -> tuple[dict, np.ndarray]:
    n, G = rewards.shape
    ids = np.arange(start, start + n)
    return {"group_id": ids, "tokens": np.repeat(ids, G)[:, None] * np.ones((1, 3), int)}, rewards


def test_dynamic_sampler_keeps_spread_groups_in_order() -> None:
    G = 2
    batches = [
        _batch(0, np.array([[1, 1], [0, 1], [0, 0]], float)),  # keeps group 1
        _batch(3, np.array([[1, 1], [1, 1], [1, 1]], float)),  # keeps nothing
        _batch(6, np.array([[1, 0], [0, 0], [0, 1], [1, 0]], float)),  # keeps 6, 8 (9 is surplus)
    ]
    sampler = DynamicSampler(target_groups=3, group_size=G, max_attempts=3)
    done = [sampler.add(*b) for b in batches]
    assert done == [False, False, True]
    batch, rewards = sampler.result()
    np.testing.assert_array_equal(batch["group_id"], [1, 6, 8])
    np.testing.assert_array_equal(batch["tokens"][:, 0], [1, 1, 6, 6, 8, 8])
    np.testing.assert_array_equal(rewards, [[0, 1], [1, 0], [0, 1]])
    assert sampler.metrics()["dynamic_sampling/kept_fraction"] == pytest.approx(4 / 10)

    it = iter(batches)
    out, kept, metrics = select_groups(lambda: next(it), target_groups=3, group_size=G, max_attempts=0)
    np.testing.assert_array_equal(out["group_id"], [1, 6, 8])
    assert metrics["dynamic_sampling/attempts"] == 3


def test_dynamic_sampler_errors_past_limit() -> None:
    sampler = DynamicSampler(target_groups=2, group_size=2, max_attempts=2)
    assert not sampler.add(*_batch(0, np.array([[0, 1], [1, 1]], float)))
    with pytest.raises(DynamicSamplingError, match="1/2 groups .* after 2 generation batches"):
        sampler.add(*_batch(2, np.array([[0, 0], [1, 1]], float)))
    flat = iter([_batch(0, np.ones((2, 2)))] * 5)
    with pytest.raises(DynamicSamplingError, match="max_attempts=4"):
        select_groups(lambda: next(flat), target_groups=1, group_size=2, max_attempts=4)


def test_dynamic_sampler_bad_input() -> None:
    with pytest.raises(ValueError, match="group_size=1"):
        DynamicSampler(target_groups=2, group_size=1)
    sampler = DynamicSampler(target_groups=4, group_size=2)
    with pytest.raises(ValueError, match="rewards must be \\[num_groups, 2\\]"):
        sampler.add({}, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="batch\\['x'\\] has shape \\(3,\\)"):
        sampler.add({"x": np.zeros(3)}, np.array([[0.0, 1.0], [1.0, 0.0]]))
    sampler.add({"x": np.zeros(2)}, np.array([[0.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="keys"):
        sampler.add({"y": np.zeros(2)}, np.array([[0.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(RuntimeError, match="2/4 groups kept"):
        sampler.result()

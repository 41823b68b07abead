"""Cache pool (Eq. 1-2), truncation (Eq. 3-4) and cache update (Eq. 9) against numpy references."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from poer_jax.poer import cache_pool as cp
from poer_jax.poer.cache_init import from_token_arrays, from_token_lists, load_answers_file
from poer_jax.poer.cache_update import best_response, cache_metrics, choose_responses, replayed_fraction, update
from poer_jax.poer.length_reward import length_aware_reward
from poer_jax.poer.truncation import (
    TruncationConfig,
    join_prefix_continuation,
    prefix_tokens,
    truncate,
    truncation_metrics,
)

PAD = 0
EOS = (7, 8)  # two EOS ids, e.g. <|im_end|> and <|endoftext|>
REPO = Path(__file__).resolve().parents[1]

jit_truncate = jax.jit(truncate, static_argnames=("config", "eos_ids"))
jit_update = jax.jit(update, static_argnames=("mode",))
jit_insert = jax.jit(cp.insert)
jit_choose = jax.jit(choose_responses, static_argnames=("mode",))


def chi2_pvalue(counts: np.ndarray, expected: np.ndarray) -> float:
    """Pearson chi-square p-value; scipy when installed, else the Wilson-Hilferty normal approximation."""
    stat = float(np.sum((counts - expected) ** 2 / expected))
    df = len(counts) - 1
    try:
        from scipy.stats import chi2
    except ImportError:
        z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
        return 0.5 * math.erfc(z / math.sqrt(2))
    return float(chi2.sf(stat, df))


def random_pool(rng: np.random.Generator, n: int, max_len: int, *, mid_eos: bool = False,
                empty_frac: float = 0.1) -> tuple[cp.CachePool, np.ndarray, np.ndarray]:
    """Answers of random length; most end in a run of 1-2 EOS tokens; optionally EOS mid-answer too."""
    tokens = rng.integers(1, 7, size=(n, max_len)).astype(np.int32)  # ids 1..6: never EOS, never pad
    lengths = rng.integers(0, max_len + 1, size=n).astype(np.int32)
    lengths[rng.random(n) < empty_frac] = 0
    for i in range(n):
        tail = rng.integers(0, 3)
        for j in range(max(lengths[i] - tail, 0), lengths[i]):
            tokens[i, j] = rng.choice(EOS)
        if mid_eos and lengths[i] > 3 and rng.random() < 0.5:
            tokens[i, rng.integers(0, lengths[i] - 1)] = rng.choice(EOS)
        tokens[i, lengths[i]:] = PAD
    pool = cp.from_state_dict({"tokens": tokens, "lengths": lengths,
                               "last_reward": np.full(n, np.nan, np.float32), "filled": lengths > 0,
                               "shortest_len": lengths.copy(), "pad_id": np.int32(PAD)})
    return pool, tokens, lengths


def ref_prefix_len(row: np.ndarray, n: int, m: int, max_completion_len: int) -> int:
    """Plain loop: drop m tokens, then back off while the prefix ends in EOS; leave room for 1 token."""
    p = max(n - m, 0)
    while p > 0 and row[p - 1] in EOS:
        p -= 1
    return min(p, max_completion_len - 1)


# ------------------------------------------------------------------------------------------- pool basics

def test_create_insert_pads_cuts_and_ignores_invalid_rows() -> None:
    pool = cp.create(5, 6, pad_id=3)
    assert pool.tokens.shape == (5, 6) and pool.tokens.dtype == jnp.int32
    assert np.all(np.asarray(pool.tokens) == 3) and not np.any(np.asarray(pool.filled))
    # width 4 < 6 is padded; garbage past the length must not enter the pool
    pool = jit_insert(pool, jnp.array([1, 4]), jnp.array([[10, 11, 12, 99], [20, 21, 22, 23]]),
                      jnp.array([3, 4]), jnp.array([0.5, 1.0]))
    np.testing.assert_array_equal(pool.tokens[1], [10, 11, 12, 3, 3, 3])
    np.testing.assert_array_equal(pool.tokens[4], [20, 21, 22, 23, 3, 3])
    # width 8 > 6 is cut and the length clamped; index -1 and 5 (out of range) are ignored
    long = jnp.arange(100, 124).reshape(3, 8)
    pool = jit_insert(pool, jnp.array([0, -1, 5]), long, jnp.array([8, 2, 2]))
    np.testing.assert_array_equal(pool.tokens[0], np.arange(100, 106))
    np.testing.assert_array_equal(pool.lengths, [6, 3, 0, 0, 4])
    np.testing.assert_array_equal(pool.filled, [True, True, False, False, True])
    np.testing.assert_array_equal(pool.shortest_len, pool.lengths)
    np.testing.assert_array_equal(np.isnan(pool.last_reward), [True, False, True, True, False])
    # duplicates: the last occurrence in the batch wins, deterministically
    pool = jit_insert(pool, jnp.array([2, 2, 2]), jnp.array([[1, 1], [2, 2], [4, 4]]), jnp.array([1, 2, 1]))
    np.testing.assert_array_equal(pool.tokens[2], [4, 3, 3, 3, 3, 3])
    assert int(pool.lengths[2]) == 1


def test_scatter_rows_last_duplicate_wins_against_python() -> None:
    rng = np.random.default_rng(0)
    idx = rng.integers(-2, 12, size=200)
    got = np.asarray(jax.jit(cp.scatter_rows, static_argnums=1)(jnp.asarray(idx), 10))
    last = {int(v): i for i, v in enumerate(idx)}
    want = [v if 0 <= v < 10 and last[int(v)] == i else 10 for i, v in enumerate(idx)]
    np.testing.assert_array_equal(got, want)


def test_question_axis_spec_replicates_when_n_does_not_divide() -> None:
    sizes = {"data": 2, "fsdp": 4, "tensor": 2}
    assert cp.question_axis_spec(16, sizes, ("data", "fsdp")) == ("data", "fsdp")
    assert cp.question_axis_spec(12, sizes, ("data", "fsdp")) is None
    assert cp.question_axis_spec(6, sizes, ("data",)) == ("data",)
    assert cp.question_axis_spec(7, {"data": 1}, ("data",)) is None  # size-1 axes: nothing to shard


def test_pool_sharding_on_host_mesh() -> None:
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"))
    pool = cp.shard_pool(cp.create(4, 3, PAD), mesh)
    assert pool.tokens.sharding.mesh.shape == mesh.shape
    with pytest.raises(ValueError, match="not in mesh axes"):
        cp.pool_sharding(pool, mesh, ("fsdp",))


def sharding_checks() -> None:
    """On a (data=2, fsdp=2) mesh: N shards over the data axes, replicates when it does not divide, and
    jitted truncate/update on the sharded pool equal the unsharded results."""
    from jax.sharding import PartitionSpec as P

    from poer_jax.poer import cache_update as cu
    from poer_jax.poer import truncation as tr

    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
    answers = jnp.arange(40).reshape(8, 5) % 6 + 1
    pool = cp.insert(cp.create(8, 5, 0), jnp.arange(8), answers, jnp.arange(8) % 6)
    sharded = cp.shard_pool(pool, mesh)
    assert sharded.tokens.sharding.spec == P(("data", "fsdp"), None), sharded.tokens.sharding.spec
    assert sharded.tokens.addressable_shards[0].data.shape == (2, 5)
    assert cp.shard_pool(cp.create(6, 5, 0), mesh).lengths.sharding.spec == P(None)
    assert cp.shard_pool(cp.create(6, 5, 0), mesh, "data").lengths.sharding.spec == P(("data",))
    cfg = tr.TruncationConfig(max_completion_len=5, max_truncation=3)
    key, idx = jax.random.key(3), jnp.array([5, 1, 7, 2])
    a = jax.jit(tr.truncate, static_argnums=(3, 4))(sharded, idx, key, cfg, (6,))
    b = tr.truncate(pool, idx, key, cfg, (6,))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    toks = jnp.arange(4 * 3 * 5).reshape(4, 3, 5) % 5 + 1
    lens = jnp.array([[1, 2, 3], [4, 5, 1], [2, 2, 2], [5, 4, 3]])
    rew = jnp.arange(12.0).reshape(4, 3) % 5
    step = jax.jit(lambda p: cu.update(p, idx, toks, lens, rew, key).pool,
                   out_shardings=cp.pool_sharding(pool, mesh))
    u, v = step(sharded), cu.update(pool, idx, toks, lens, rew, key).pool
    assert u.tokens.sharding.spec == P(("data", "fsdp"), None)
    pairs = zip(jax.tree.leaves(u), jax.tree.leaves(v), strict=True)
    assert all(np.array_equal(x, y, equal_nan=True) for x, y in pairs)


def test_shard_pool_over_four_host_devices() -> None:
    """In process when tests/conftest.py gave us >= 4 host devices, else in a fresh process that has them."""
    if len(jax.devices()) >= 4:
        sharding_checks()
        return
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = "from tests.test_cache_pool import sharding_checks; sharding_checks(); print('OK')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_state_dict_roundtrip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pool, _, _ = random_pool(rng, 9, 7)
    pool = jit_update(pool, jnp.array([0, 3]), jnp.ones((2, 2, 7), jnp.int32), jnp.array([[3, 4], [5, 6]]),
                      jnp.array([[0.25, 0.75], [1.0, 0.0]]), jax.random.key(0)).pool
    state = cp.to_state_dict(pool)
    assert all(isinstance(v, np.ndarray) for v in state.values())
    np.savez(tmp_path / "pool.npz", **state)
    with np.load(tmp_path / "pool.npz") as loaded:
        restored = cp.from_state_dict(dict(loaded))
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "orbax", state)
        ckpt.wait_until_finished()
        via_orbax = cp.from_state_dict(ckpt.restore(tmp_path / "orbax"))
    for other in (restored, via_orbax):
        assert other.pad_id == pool.pad_id
        for f in cp.ARRAY_FIELDS:
            a, b = np.asarray(getattr(pool, f)), np.asarray(getattr(other, f))
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), f
    with pytest.raises(ValueError, match="missing keys"):
        cp.from_state_dict({k: v for k, v in state.items() if k != "shortest_len"})
    with pytest.raises(ValueError, match="'lengths' has dtype"):
        cp.from_state_dict({**state, "lengths": state["lengths"].astype(np.int64)})
    with pytest.raises(ValueError, match="'filled' has shape"):
        cp.from_state_dict({**state, "filled": state["filled"][:3]})


# -------------------------------------------------------------------------------------------- truncation

def test_m_is_uniform_on_0_to_L_inclusive() -> None:
    """Eq. 3: m ~ U{0, ..., L}, one draw per group; chi-square with a fixed seed."""
    L, groups = 10, 22_000
    pool = cp.insert(cp.create(groups, 4, PAD), jnp.arange(groups), jnp.ones((groups, 4), jnp.int32),
                     jnp.full((groups,), 4))
    cfg = TruncationConfig(max_completion_len=16, max_truncation=L)
    tr = jit_truncate(pool, jnp.arange(groups), jax.random.key(42), cfg, EOS)
    m = np.asarray(tr.m)
    assert m.min() == 0 and m.max() == L
    counts = np.bincount(m, minlength=L + 1)
    expected = np.full(L + 1, groups / (L + 1))
    assert chi2_pvalue(counts, expected) > 1e-3, counts
    np.testing.assert_array_equal(tr.L, L)
    # power check: the same test rejects U{0..L-1} (an exclusive upper bound, the common off-by-one)
    off_by_one = np.bincount(np.asarray(jax.random.randint(jax.random.key(42), (groups,), 0, L)),
                             minlength=L + 1)
    assert chi2_pvalue(off_by_one, expected) < 1e-6


def test_authors_mode_shares_m_in_1_to_L_minus_1() -> None:
    L, batch, draws = 6, 5, 3000
    pool = cp.insert(cp.create(batch, 12, PAD), jnp.arange(batch), jnp.ones((batch, 12), jnp.int32),
                     jnp.full((batch,), 12))
    cfg = TruncationConfig(max_completion_len=12, max_truncation=L, mode="authors")
    keys = jax.random.split(jax.random.key(5), draws)
    m = np.asarray(jax.jit(jax.vmap(lambda k: truncate(pool, jnp.arange(batch), k, cfg, EOS).m))(keys))
    assert np.all(m == m[:, :1]), "one m per batch"
    counts = np.bincount(m[:, 0], minlength=L)
    assert counts[0] == 0 and counts[1:].min() > 0 and m.max() == L - 1
    assert chi2_pvalue(counts[1:], np.full(L - 1, draws / (L - 1))) > 1e-3
    with pytest.raises(ValueError, match="fixed L"):
        TruncationConfig(max_completion_len=8, limit="dynamic", mode="authors")


def test_dynamic_L_follows_shortest_response_of_last_group() -> None:
    """Eq. 4: L = floor(fraction * l), l = shortest full response of the question's last group."""
    n = 6
    pool = cp.insert(cp.create(n, 40, PAD), jnp.arange(n), jnp.ones((n, 40), jnp.int32),
                     jnp.array([0, 1, 7, 10, 33, 40]))
    # the paper's main setting; max_truncation (default 300, here 1) is not a cap of the dynamic rule
    half = TruncationConfig(max_completion_len=64, limit="dynamic", fraction=0.5, max_truncation=1)
    tr = jit_truncate(pool, jnp.arange(n), jax.random.key(0), half, EOS)
    np.testing.assert_array_equal(tr.L, [0, 0, 3, 5, 16, 20])  # initialised from the cached length
    capped = TruncationConfig(max_completion_len=64, limit="both", max_truncation=4, fraction=0.3)
    np.testing.assert_array_equal(jit_truncate(pool, jnp.arange(n), jax.random.key(0), capped, EOS).L,
                                  [0, 0, 2, 3, 4, 4])  # min(floor(0.3 l), 4); 0.3*10 is exactly 3
    fixed = TruncationConfig(max_completion_len=64, limit="fixed", max_truncation=4, fraction=0.3)
    np.testing.assert_array_equal(jit_truncate(pool, jnp.arange(n), jax.random.key(0), fixed, EOS).L, [4] * n)
    with pytest.raises(ValueError, match="limit"):
        TruncationConfig(max_completion_len=64, limit="shortest")
    # after a group update, l = min over the group's lengths (not the stored answer's length)
    lens = jnp.array([[30, 12, 25], [9, 40, 40]])
    pool = jit_update(pool, jnp.array([4, 5]), jnp.ones((2, 3, 40), jnp.int32), lens,
                      jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), jax.random.key(1), epsilon=1.0).pool
    np.testing.assert_array_equal(pool.lengths[4:], [30, 40])
    np.testing.assert_array_equal(pool.shortest_len[4:], [12, 9])
    keys = jax.random.split(jax.random.key(2), 400)
    trs = jax.jit(jax.vmap(lambda k: truncate(pool, jnp.arange(n), k, half, EOS)))(keys)
    np.testing.assert_array_equal(trs.L[0], [0, 0, 3, 5, 6, 4])
    np.testing.assert_array_equal(np.asarray(trs.m).max(axis=0), [0, 0, 3, 5, 6, 4])
    assert np.asarray(trs.m).min() == 0


@pytest.mark.parametrize("budget", ["removed", "max_length"])
@pytest.mark.parametrize("mid_eos", [False, True])
@pytest.mark.parametrize("cap", [None, 3])
def test_prefix_len_and_budget_match_reference_and_never_end_in_eos(budget: str, mid_eos: bool,
                                                                    cap: int | None) -> None:
    rng = np.random.default_rng(7 + mid_eos)
    n, max_len, mcl = 300, 12, 10  # pool wider than max_completion_len: exercises the room cap
    pool, tokens, lengths = random_pool(rng, n, max_len, mid_eos=mid_eos)
    idx = np.concatenate([rng.integers(0, n, size=250), [-1, n]])  # two invalid rows read as empty
    cfg = TruncationConfig(max_completion_len=mcl, max_truncation=5, budget=budget, max_continuation=cap)
    tr = jit_truncate(pool, jnp.asarray(idx), jax.random.key(11), cfg, EOS)
    got_p, got_m = np.asarray(tr.prefix_len), np.asarray(tr.m)
    prefix = np.asarray(prefix_tokens(pool, jnp.asarray(idx), tr))
    for b, k in enumerate(idx):
        valid = 0 <= k < n
        row, ln = (tokens[k], int(lengths[k])) if valid else (np.zeros(max_len, np.int32), 0)
        p = ref_prefix_len(row, ln, int(got_m[b]), mcl)
        assert got_p[b] == p, (b, k)
        if p:
            assert row[p - 1] not in EOS
            np.testing.assert_array_equal(prefix[b, :p], row[:p])
        assert np.all(prefix[b, p:] == PAD)
        if not mid_eos and ln:
            stripped = ln
            while stripped and row[stripped - 1] in EOS:
                stripped -= 1
            assert p == min(max(ln - int(got_m[b]), 0), stripped, mcl - 1)  # the spec's closed form
        room = mcl - p
        want = room if budget == "max_length" or ln == 0 else min(max(1, ln - p), room)
        want = want if cap is None else min(want, cap)  # rollout.max_continuation_len
        assert int(tr.budget[b]) == want and int(tr.removed[b]) == max(ln - p, 0)
        assert p + int(tr.budget[b]) <= mcl and int(tr.budget[b]) >= 1
    metrics = truncation_metrics(tr)
    assert float(metrics["cache/trunc_prefix_len_mean"]) == pytest.approx(got_p.mean(), rel=1e-6)


def test_continuation_cap_is_validated() -> None:
    with pytest.raises(ValueError, match="max_continuation must be None or >= 1"):
        TruncationConfig(max_completion_len=8, max_continuation=0)


def test_trailing_eos_is_removed_even_with_m_zero() -> None:
    answers = jnp.array([[1, 2, 3, 7, 0, 0], [1, 2, 3, 4, 0, 0]])
    pool = cp.insert(cp.create(2, 6, PAD), jnp.array([0, 1]), answers, jnp.array([4, 4]))
    cfg = TruncationConfig(max_completion_len=6, max_truncation=0, budget="removed")
    tr = jit_truncate(pool, jnp.array([0, 1]), jax.random.key(0), cfg, EOS)
    np.testing.assert_array_equal(tr.m, [0, 0])
    np.testing.assert_array_equal(tr.prefix_len, [3, 4])
    np.testing.assert_array_equal(tr.budget, [1, 1])  # m = 0: at least one new token (authors: 0)


def test_join_prefix_continuation_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    b, g, tp, tc, out_len = 7, 3, 6, 5, 9
    prefix = rng.integers(1, 50, size=(b, tp)).astype(np.int32)
    plen = rng.integers(0, tp + 1, size=b).astype(np.int32)
    cont = rng.integers(50, 99, size=(b, g, tc)).astype(np.int32)
    clen = rng.integers(0, tc + 1, size=(b, g)).astype(np.int32)
    join = jax.jit(join_prefix_continuation, static_argnums=(4, 5))
    toks, lens = join(prefix, plen, cont, clen, PAD, out_len)
    for i in range(b):
        for j in range(g):
            full = np.concatenate([prefix[i, :plen[i]], cont[i, j, :clen[i, j]]])[:out_len]
            np.testing.assert_array_equal(toks[i, j], np.pad(full, (0, out_len - full.size)))
            assert int(lens[i, j]) == full.size


# ------------------------------------------------------------------------------------------- cache update

def test_epsilon_greedy_best_with_prob_epsilon_else_uniform_other() -> None:
    """Eq. 9: u < epsilon -> argmax; otherwise one of the G-1 other responses, uniformly."""
    groups, g, eps = 30_000, 6, 0.1
    rng = np.random.default_rng(0)
    rewards = rng.permuted(np.tile(np.arange(g, dtype=np.float32), (groups, 1)), axis=1)  # distinct per row
    best = rewards.argmax(axis=1)
    chosen, took_best = jit_choose(jnp.asarray(rewards), jax.random.key(9), eps)
    chosen, took_best = np.asarray(chosen), np.asarray(took_best)
    np.testing.assert_array_equal(took_best, chosen == best)
    frac = took_best.mean()
    assert abs(frac - eps) < 5 * math.sqrt(eps * (1 - eps) / groups), frac
    rank_among_others = (chosen - (chosen > best))[~took_best]  # 0..G-2 when not the argmax
    counts = np.bincount(rank_among_others, minlength=g - 1)
    assert chi2_pvalue(counts, np.full(g - 1, counts.sum() / (g - 1))) > 1e-3, counts
    never = np.asarray(jit_choose(jnp.asarray(rewards), jax.random.key(1), 0.0)[1])
    always = np.asarray(jit_choose(jnp.asarray(rewards), jax.random.key(1), 1.0)[1])
    assert not never.any() and always.all()
    single, single_best = jit_choose(jnp.zeros((50, 1)), jax.random.key(2), 0.3)
    assert not np.asarray(single).any() and np.asarray(single_best).all()


def _best_reference(rewards: np.ndarray, primary: np.ndarray | None, lengths: np.ndarray | None) -> np.ndarray:
    """Plain-Python lexicographic ranking: max primary, then max reward, then min length, then first."""
    out = []
    for b in range(rewards.shape[0]):
        def key(i: int, b: int = b) -> tuple:
            p = -np.inf if primary is None or np.isnan(primary[b, i]) else primary[b, i]
            r = -np.inf if np.isnan(rewards[b, i]) else rewards[b, i]
            return (p, r, -(lengths[b, i] if lengths is not None else 0), -i)
        out.append(max(range(rewards.shape[1]), key=key))
    return np.asarray(out)


def test_best_response_is_correct_first_then_shaped_reward_then_shortest() -> None:
    """The issue's case: Eq. 10 (literal) gives all six 0.5; the best is the shorter correct answer (index 3)."""
    raw = jnp.array([[0.0, 1.0, 0.0, 1.0, 0.0, 0.0]])
    lengths = jnp.array([[200, 900, 300, 700, 250, 350]])
    shaped = length_aware_reward(raw, lengths, variant="paper")
    np.testing.assert_allclose(shaped, 0.5)
    assert int(jnp.argmax(shaped)) == 0  # Eq. 9's plain argmax would cache a wrong answer
    assert int(best_response(shaped, raw > 0.5, lengths)[0]) == 3
    assert int(best_response(shaped, raw > 0.5)[0]) == 1  # without lengths: the first correct one
    chosen, took_best = jit_choose(shaped, jax.random.key(0), 1.0, primary=raw, lengths=lengths)
    assert int(chosen[0]) == 3 and bool(took_best[0])
    # the epsilon-greedy update stores it, with the shaped reward as last_reward
    pool = cp.create(1, 900, PAD)
    toks = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32)[None, :, None] + 1, (1, 6, 900))
    res = jit_update(pool, jnp.array([0]), toks, lengths, shaped, jax.random.key(1), epsilon=1.0, primary=raw)
    assert int(res.chosen[0]) == 3 and int(res.pool.lengths[0]) == 700
    # against a plain-Python ranking on random groups with ties and NaNs
    rng = np.random.default_rng(0)
    r = rng.integers(0, 3, (400, 5)).astype(np.float32)
    r[rng.random(r.shape) < 0.1] = np.nan
    p = rng.integers(0, 2, (400, 5)).astype(np.float32)
    ln = rng.integers(1, 4, (400, 5))
    for prim, lens in ((p, ln), (None, ln), (p, None), (None, None)):
        got = best_response(jnp.asarray(r), None if prim is None else jnp.asarray(prim),
                            None if lens is None else jnp.asarray(lens))
        np.testing.assert_array_equal(got, _best_reference(r, prim, lens))


def test_authors_update_never_randomly_picks_last_sample() -> None:
    groups, g = 20_000, 4
    last_is_best = jnp.tile(jnp.arange(g, dtype=jnp.float32), (groups, 1))
    chosen, _ = jit_choose(last_is_best, jax.random.key(4), 0.9, mode="authors")  # epsilon is ignored
    frac_last = np.mean(np.asarray(chosen) == g - 1)
    assert abs(frac_last - 0.5) < 5 * math.sqrt(0.25 / groups)
    first_is_best = last_is_best[:, ::-1]
    chosen, _ = jit_choose(first_is_best, jax.random.key(4), 0.1, mode="authors")
    counts = np.bincount(np.asarray(chosen), minlength=g)
    assert counts[g - 1] == 0
    expected = groups * np.array([0.5 + 0.5 / (g - 1)] + [0.5 / (g - 1)] * (g - 2))
    assert chi2_pvalue(counts[: g - 1], expected) > 1e-3, counts


def test_update_stores_chosen_full_response_and_group_stats() -> None:
    rng = np.random.default_rng(5)
    n, max_len, b, g, t = 10, 6, 5, 3, 8  # responses wider than the pool: cut to max_len
    pool, _, _ = random_pool(rng, n, max_len)
    before = cp.to_state_dict(pool)
    idx = np.array([4, 9, -1, 2, 4])  # -1 ignored; row 4 twice: the last group wins
    toks = rng.integers(1, 50, size=(b, g, t)).astype(np.int32)
    lens = rng.integers(0, t + 1, size=(b, g)).astype(np.int32)
    rewards = rng.random((b, g)).astype(np.float32)
    res = jit_update(pool, jnp.asarray(idx), jnp.asarray(toks), jnp.asarray(lens), jnp.asarray(rewards),
                     jax.random.key(3), epsilon=0.5)
    after = cp.to_state_dict(res.pool)
    chosen = np.asarray(res.chosen)
    np.testing.assert_array_equal(res.updated, [False, True, False, True, True])
    np.testing.assert_array_equal(chosen < 0, ~np.asarray(res.updated))
    for bi in (1, 3, 4):
        k, c = idx[bi], chosen[bi]
        ln = min(lens[bi, c], max_len)
        np.testing.assert_array_equal(after["tokens"][k], np.pad(toks[bi, c, :ln], (0, max_len - ln)))
        assert after["lengths"][k] == ln and after["filled"][k] == (ln > 0)
        assert after["last_reward"][k] == rewards[bi, c] and after["shortest_len"][k] == lens[bi].min()
    untouched = [k for k in range(n) if k not in (2, 4, 9)]
    for f in cp.ARRAY_FIELDS:
        np.testing.assert_array_equal(after[f][untouched], before[f][untouched])
    metrics = cache_metrics(res.pool, res)
    filled = after["filled"]
    rewarded = filled & np.isfinite(after["last_reward"])
    assert float(metrics["cache/filled_frac"]) == pytest.approx(filled.mean())
    assert float(metrics["cache/mean_length"]) == pytest.approx(after["lengths"][filled].mean())
    assert float(metrics["cache/mean_last_reward"]) == pytest.approx(after["last_reward"][rewarded].mean())
    assert float(metrics["cache/updates"]) == 3
    took_best = np.asarray(res.took_best)[[1, 3, 4]]
    assert float(metrics["cache/took_best_frac"]) == pytest.approx(took_best.mean())
    # rows 4 and 9 now hold rollout answers (finite reward), row 0 its initial one, -1 is padding
    assert float(replayed_fraction(res.pool, jnp.asarray([4, 9, 0, -1]))) == pytest.approx(2 / 3)
    assert float(replayed_fraction(pool, jnp.asarray([4, 9, 0, -1]))) == 0.0


def test_no_update_never_changes_the_pool() -> None:
    rng = np.random.default_rng(6)
    pool, _, _ = random_pool(rng, 8, 5)
    before = cp.to_state_dict(pool)
    for step in range(5):
        toks = jnp.asarray(rng.integers(1, 9, size=(4, 3, 5)), jnp.int32)
        res = jit_update(pool, jnp.asarray(rng.integers(0, 8, size=4)), toks, jnp.full((4, 3), 2),
                         jnp.asarray(rng.random((4, 3)), jnp.float32), jax.random.key(step), mode="none")
        pool = res.pool
        assert not np.asarray(res.updated).any() and np.all(np.asarray(res.chosen) == -1)
    after = cp.to_state_dict(pool)
    for f in (*cp.ARRAY_FIELDS, "pad_id"):
        assert np.array_equal(before[f], after[f], equal_nan=True), f
    assert float(cache_metrics(pool, res)["cache/took_best_frac"]) == 0.0
    with pytest.raises(ValueError, match="mode must be one of"):
        update(pool, jnp.zeros(1, jnp.int32), toks[:1], jnp.ones((1, 3)), jnp.ones((1, 3)), jax.random.key(0),
               mode="greedy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epsilon"):
        update(pool, jnp.zeros(1, jnp.int32), toks[:1], jnp.ones((1, 3)), jnp.ones((1, 3)), jax.random.key(0),
               epsilon=1.5)


# ---------------------------------------------------------------------------------------- initialisation

def test_from_token_lists_eos_truncation_and_empty_rows() -> None:
    lists = [[1, 2, 3], [], None, [4, 5, 6, 7, 8, 9], [1, 2, 99], np.array([5, 5])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pool = from_token_lists(lists, max_len=4, pad_id=PAD, eos_id=99)
    messages = [str(w.message) for w in caught]
    assert any("1 of 6 answers were longer than max_len=4" in m and "[3]" in m for m in messages), messages
    assert any("2 of 6 rows have no answer" in m for m in messages), messages
    np.testing.assert_array_equal(pool.tokens, [[1, 2, 3, 99], [0] * 4, [0] * 4, [4, 5, 6, 7], [1, 2, 99, 0],
                                                [5, 5, 99, 0]])
    np.testing.assert_array_equal(pool.lengths, [4, 0, 0, 4, 3, 3])
    np.testing.assert_array_equal(pool.filled, [True, False, False, True, True, True])
    np.testing.assert_array_equal(pool.shortest_len, pool.lengths)
    assert np.isnan(np.asarray(pool.last_reward)).all()
    with pytest.warns(UserWarning, match="3 of 4 rows have no answer"):
        sparse = from_token_lists({2: [3, 3]}, max_len=3, pad_id=PAD, num_questions=4)
    np.testing.assert_array_equal(sparse.lengths, [0, 0, 2, 0])
    with pytest.raises(ValueError, match="num_questions is required"):
        from_token_lists({0: [1]}, max_len=3, pad_id=PAD)
    with pytest.raises(ValueError, match="row 1: token ids must be in"):
        from_token_lists([[1], [-4]], max_len=3, pad_id=PAD)
    with pytest.raises(ValueError, match="row 0: expected a flat list of integer"):
        from_token_lists([[1.5]], max_len=3, pad_id=PAD)
    # sampler output path (Eq. 1) goes through the same jittable insert
    sampled = jnp.array([[5, 6, 7], [8, 9, 1]])
    filled = jax.jit(from_token_arrays)(cp.create(3, 4, PAD), jnp.array([2, 0]), sampled, jnp.array([2, 3]),
                                        jnp.array([1.0, 0.0]))
    np.testing.assert_array_equal(filled.lengths, [3, 0, 2])


def test_load_answers_file_by_index_and_problem(tmp_path: Path) -> None:
    problems = ["1+1?", "2+2?", "1+1?"]
    path = tmp_path / "answers.jsonl"
    rows = [{"index": 1, "answer_text": "four", "problem": "2+2?"},
            {"problem": " 1+1? ", "completion": "two"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    tokenize = lambda s: [ord(c) for c in s]  # noqa: E731
    got = load_answers_file(path, tokenize, num_questions=3, problems=problems)
    assert got == {1: tokenize("four"), 0: tokenize("two"), 2: tokenize("two")}
    pool = from_token_lists(got, max_len=8, pad_id=PAD, eos_id=1, num_questions=3)
    np.testing.assert_array_equal(pool.lengths, [4, 5, 4])

    def bad(lines: list[str], match: str, **kw: object) -> None:
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=match):
            load_answers_file(path, tokenize, num_questions=3, **kw)  # type: ignore[arg-type]

    ok = json.dumps({"index": 0, "answer_text": "x"})
    bad([ok, "{not json"], r"answers.jsonl:2: malformed JSON")
    bad([ok, json.dumps({"index": 0})], r"answers.jsonl:2: needs a string field 'answer_text'")
    bad([json.dumps({"index": 3, "answer_text": "x"})], r"jsonl:1: 'index' must be an integer in \[0, 3")
    bad([json.dumps({"answer_text": "x"})], r"answers.jsonl:1: needs an 'index' or a 'problem'")
    bad([json.dumps({"problem": "9?", "answer_text": "x"})], r":1: 'problem' not found", problems=problems)
    bad([json.dumps({"problem": "1+1?", "answer_text": "x"})], r":1: .*pass problems=")
    bad([json.dumps({"index": 0, "problem": "2+2?", "answer_text": "x"})], r":1: 'problem' does not match",
        problems=problems)
    bad([ok, ok], r"answers.jsonl:2: a second answer for dataset row 0")
    path.write_text(ok + "\n")
    with pytest.raises(ValueError, match=r"answers.jsonl:1: tokenize failed"):
        load_answers_file(path, lambda s: 1 / 0, num_questions=3)  # type: ignore[arg-type, return-value]

"""Paged-KV sampler vs full recompute: greedy tokens, log-probs, EOS/budget, prefix sharing, pool limits.
(Data-parallel / tensor-sharded sampling and small pools: tests/test_sampler_dp.py.)

The reference is the model's own ``forward`` over the whole growing sequence (no cache). Tiny fp32 models
with a large init scale, so greedy argmaxes are far from ties.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poer_jax.model.config import QwenConfig
from poer_jax.model.qwen import dense_attention, forward, init_params, logits_from_hidden
from poer_jax.sampler import (
    FINISH_BUDGET,
    FINISH_EOS,
    GroupSampler,
    PageAllocator,
    PagedEngine,
    PoolExhaustedError,
    SamplerConfig,
    SamplerError,
    SamplingParams,
    paged_decode_attention,
)
from poer_jax.sampler.paged_attention import SharedPrefix
from poer_jax.sampler.pages import allocate_groups, group_page_counts

GREEDY = SamplingParams(temperature=0.0)
QWEN2 = QwenConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
)
QWEN3 = QWEN2.replace(model_type="qwen3", qkv_bias=False, qk_norm=True, tie_word_embeddings=True, head_dim=12)
PROMPT_LENS = (1, 4, 5, 16, 17, 23)  # on / off page boundaries for page sizes 1, 4, 16
BUDGETS = (6, 9, 3, 12, 7, 10)
G = 3


def _params(cfg: QwenConfig, seed: int = 0) -> dict:
    return init_params(cfg, jax.random.key(seed), std=0.3)


def _prompts(lens: tuple[int, ...], vocab: int, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lens]


@partial(jax.jit, static_argnums=1)
def _last_logits(params: dict, cfg: QwenConfig, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    mask = jnp.arange(tokens.shape[1])[None] < lengths[:, None]
    h = forward(params, cfg, tokens, None, mask)
    return logits_from_hidden(params, cfg, h[jnp.arange(tokens.shape[0]), lengths - 1])


@partial(jax.jit, static_argnums=1)
def _all_logits(params: dict, cfg: QwenConfig, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    mask = jnp.arange(tokens.shape[1])[None] < lengths[:, None]
    return logits_from_hidden(params, cfg, forward(params, cfg, tokens, None, mask))


def naive_greedy(
    params: dict, cfg: QwenConfig, prompts: list[list[int]], budgets: list[int], width: int = 64
) -> list[list[int]]:
    """Greedy by full recompute: each step re-runs the model over prompt + generated so far."""
    buf = np.zeros((len(prompts), width), np.int32)
    lens = np.array([len(p) for p in prompts], np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(max(budgets)):
        nxt = np.asarray(jnp.argmax(_last_logits(params, cfg, jnp.asarray(buf), jnp.asarray(lens)), axis=-1))
        for i in range(len(prompts)):
            if len(out[i]) < budgets[i]:
                out[i].append(int(nxt[i]))
                buf[i, lens[i]] = nxt[i]
                lens[i] += 1
    return out


def teacher_forced_logits(params: dict, cfg: QwenConfig, prompts: list[list[int]], res, width: int = 64):
    """[n, M, V] logits that predicted each returned token, from one forward over prompt + tokens."""
    n, M = res.tokens.shape
    buf = np.zeros((n, width), np.int32)
    lens = np.zeros((n,), np.int32)
    for r in range(n):
        p = prompts[res.group[r]]
        seq = list(p) + res.tokens[r, : res.lengths[r]].tolist()
        buf[r, : len(seq)] = seq
        lens[r] = len(seq)
    logits = np.asarray(_all_logits(params, cfg, jnp.asarray(buf), jnp.asarray(lens)))
    out = np.zeros((n, M, cfg.vocab_size), np.float64)
    for r in range(n):
        P = res.prompt_lens[r]
        out[r, : res.lengths[r]] = logits[r, P - 1 : P - 1 + res.lengths[r]]
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def truncated_logprobs(z: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Reference log-probs of the sampling distribution: sort, keep top-k, keep nucleus, renormalise."""
    out = np.full_like(z, -np.inf)
    for idx in np.ndindex(z.shape[:-1]):
        row = z[idx]
        order = np.argsort(-row, kind="stable")
        keep = order[:top_k] if top_k else order
        p = np.exp(row[keep] - row[keep].max())
        p /= p.sum()
        keep = keep[(np.cumsum(p) - p) < top_p]
        out[idx][keep] = row[keep] - np.log(np.exp(row[keep] - row[keep].max()).sum()) - row[keep].max()
    return out


@pytest.fixture(scope="module")
def params2() -> dict:
    return _params(QWEN2)


def _sampler(
    params: dict,
    cfg: QwenConfig,
    page_size: int,
    sp: SamplingParams = GREEDY,
    eos=(),
    num_pages: int = 256,
    mesh=None,
    max_prefill_tokens: int = 16384,
    dynamic_chunks: bool = True,
    tail_rows: str = "auto",
) -> GroupSampler:
    scfg = SamplerConfig(
        page_size=page_size,
        num_pages=num_pages,
        attn_chunk_pages=2,
        eos_ids=tuple(eos),
        pad_id=0,
        sampling=sp,
        max_prefill_tokens=max_prefill_tokens,
        attn_dynamic_chunks=dynamic_chunks,
        tail_rows=tail_rows,
    )
    return GroupSampler(params, cfg, scfg, mesh=mesh)


# ---- 1. greedy == full recompute -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg_name,page_size,dynamic",
    [("qwen2", 1, True), ("qwen2", 4, True), ("qwen2", 16, True), ("qwen3", 4, True), ("qwen2", 4, False)],
)
def test_greedy_matches_full_recompute(params2: dict, cfg_name: str, page_size: int, dynamic: bool) -> None:
    """dynamic=False: the fixed-trip-count attention loop used on GPUs."""
    cfg = QWEN2 if cfg_name == "qwen2" else QWEN3
    params = params2 if cfg_name == "qwen2" else _params(QWEN3)
    prompts = _prompts(PROMPT_LENS, cfg.vocab_size)
    sampler = _sampler(params, cfg, page_size, dynamic_chunks=dynamic)
    res = sampler.generate(prompts, G, list(BUDGETS), jax.random.key(0))
    ref = naive_greedy(params, cfg, prompts, list(BUDGETS))
    for r in range(len(prompts) * G):
        g = r // G
        assert res.tokens[r, : res.lengths[r]].tolist() == ref[g], (
            f"page {page_size}, group {g}, sample {r % G}"
        )
        assert res.lengths[r] == BUDGETS[g] and res.finish_reason[r] == FINISH_BUDGET
        assert (res.tokens[r, res.lengths[r] :] == 0).all()
    assert res.tokens.shape == (len(prompts) * G, max(BUDGETS))
    assert sampler.num_free_pages == sampler.scfg.num_pages  # every page returned


# ---- 2. log-probs == teacher forcing ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "sp",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=0.9, top_k=12, top_p=0.7),
    ],
)
def test_logprobs_match_teacher_forcing(params2: dict, sp: SamplingParams) -> None:
    prompts = _prompts(PROMPT_LENS, QWEN2.vocab_size, seed=2)
    res = _sampler(params2, QWEN2, 4, sp).generate(prompts, 4, list(BUDGETS), jax.random.key(7))
    n = len(prompts) * 4
    logits = teacher_forced_logits(params2, QWEN2, prompts, res) / sp.temperature
    mask = np.arange(res.tokens.shape[1])[None] < res.lengths[:, None]
    tok = res.tokens[..., None]
    policy = np.take_along_axis(_log_softmax(logits), tok, -1)[..., 0]
    sampling = np.take_along_axis(truncated_logprobs(logits, sp.top_k, sp.top_p), tok, -1)[..., 0]
    np.testing.assert_allclose(res.policy_logprobs[mask], policy[mask], atol=1e-4)
    np.testing.assert_allclose(res.logprobs[mask], sampling[mask], atol=1e-4)  # also: every token was allowed
    assert (res.logprobs[~mask] == 0).all() and (res.policy_logprobs[~mask] == 0).all()
    # copy on write: samples of one group diverge, yet each matches the teacher-forced log-probs above
    distinct = [len({tuple(res.tokens[g * 4 + i]) for i in range(4)}) for g in range(len(prompts))]
    assert max(distinct) > 1 and n == res.tokens.shape[0]


def test_chunked_prefill_changes_nothing(params2: dict) -> None:
    sp = SamplingParams(temperature=1.0)
    prompts = _prompts(PROMPT_LENS, QWEN2.vocab_size, seed=2)
    one = _sampler(params2, QWEN2, 4, sp).generate(prompts, 4, list(BUDGETS), jax.random.key(7))
    chunked = _sampler(params2, QWEN2, 4, sp, max_prefill_tokens=64)  # 32-token bucket: 2 groups per call
    res = chunked.generate(prompts, 4, list(BUDGETS), jax.random.PRNGKey(7))  # raw key data: same stream
    assert chunked.last_plan.groups_per_prefill == 2
    np.testing.assert_array_equal(res.tokens, one.tokens)
    # float32 rounding of prefills of other batch shapes (XLA:CPU's reductions are per shape): ~1e-5 of a log-prob
    np.testing.assert_allclose(res.policy_logprobs, one.policy_logprobs, atol=1e-5, rtol=1e-5)
    assert res.prefilled_tokens == sum(PROMPT_LENS)


def test_group_offset_gives_a_split_batch_the_samples_of_the_whole(params2: dict) -> None:
    """Multi-host: a process sampling prompts [k:] of a batch with group_offset=k draws what one call on the
    whole batch draws for them."""
    sp = SamplingParams(temperature=1.0)
    prompts = _prompts(PROMPT_LENS, QWEN2.vocab_size, seed=2)
    whole = _sampler(params2, QWEN2, 4, sp).generate(prompts, 4, list(BUDGETS), jax.random.key(7))
    k = 2
    part = _sampler(params2, QWEN2, 4, sp).generate(prompts[k:], 4, list(BUDGETS)[k:], jax.random.key(7),
                                                    group_offset=k)
    np.testing.assert_array_equal(part.tokens, whole.tokens[k * 4:, : part.tokens.shape[1]])
    np.testing.assert_allclose(part.policy_logprobs, whole.policy_logprobs[k * 4:, : part.tokens.shape[1]],
                               atol=1e-5, rtol=1e-5)  # prefills of other batch shapes: float32 rounding
    plain = _sampler(params2, QWEN2, 4, sp).generate(prompts[k:], 4, list(BUDGETS)[k:], jax.random.key(7))
    assert not np.array_equal(plain.tokens, part.tokens)  # the offset is what lines the streams up
    with pytest.raises(SamplerError, match="group_offset"):
        _sampler(params2, QWEN2, 4, sp).generate(prompts, 4, 4, jax.random.key(7), group_offset=-1)


# ---- 4. EOS and budget -----------------------------------------------------------------------------------
def test_eos_and_budget_stops(params2: dict) -> None:
    prompts = _prompts(PROMPT_LENS, QWEN2.vocab_size)
    ref = naive_greedy(params2, QWEN2, prompts, list(BUDGETS))
    eos = (ref[1][0], ref[3][4])  # group 1 stops on its first (prefill-sampled) token, group 3 at index <= 4
    res = _sampler(params2, QWEN2, 4, eos=eos).generate(prompts, 2, list(BUDGETS), jax.random.key(0))
    for r in range(len(prompts) * 2):
        seq = ref[r // 2]
        hits = [i for i, t in enumerate(seq) if t in eos]
        length = hits[0] + 1 if hits else len(seq)
        assert res.lengths[r] == length
        assert res.finish_reason[r] == (FINISH_EOS if hits else FINISH_BUDGET)
        assert res.tokens[r, :length].tolist() == seq[:length]
        assert (res.tokens[r, length:] == 0).all() and (res.logprobs[r, length:] == 0).all()
        assert (res.policy_logprobs[r, length:] == 0).all()
    assert res.lengths[2] == 1 and res.lengths[6] <= 5
    assert res.decoded_tokens == int(res.lengths.sum()) - len(prompts) * 2
    assert res.generated_tokens == int(res.lengths.sum())


def test_decode_steps_and_row_utilisation_count_the_loop(params2: dict) -> None:
    """The critical path the trainer reports: decode loop iterations (counted on device), rows per step and the
    share of them that made a token, for known lengths (no EOS: every sample runs to its budget)."""
    sampler = _sampler(params2, QWEN2, 4)
    one = sampler.generate(_prompts((5,), QWEN2.vocab_size), 3, 9, jax.random.key(0))
    # the first token comes from prefill; each decode step adds one token to every live sample
    assert one.lengths.tolist() == [9, 9, 9] and one.decode_steps == 8
    assert one.decode_rows == 3 and one.row_utilisation == 1.0
    two = sampler.generate(_prompts((5, 7), QWEN2.vocab_size), 2, [5, 9], jax.random.key(0))
    assert two.lengths.tolist() == [5, 5, 9, 9] and two.decode_steps == 8 and two.decode_rows == 4
    assert two.decoded_tokens == 4 + 4 + 8 + 8 and two.row_utilisation == pytest.approx(24 / (8 * 4))
    # a pool for one group at a time: two segments, one after the other; the steps add up
    shared, private = group_page_counts(5, [9] * 2, 4)
    small = _sampler(params2, QWEN2, 4, num_pages=shared + sum(private))
    seq = small.generate(_prompts((5, 5), QWEN2.vocab_size), 2, [9, 6], jax.random.key(0))
    assert seq.decode_segments == 2 and seq.decode_steps == 8 + 5 and seq.decode_rows == 2
    assert seq.row_utilisation == pytest.approx((8 + 8 + 5 + 5) / (13 * 2))
    # stopped by EOS: the loop runs until the longest sample stops, not to the budget
    ref = naive_greedy(params2, QWEN2, _prompts((5,), QWEN2.vocab_size), [9])[0]
    eos = _sampler(params2, QWEN2, 4, eos=(ref[3],)).generate(_prompts((5,), QWEN2.vocab_size), 2, 9,
                                                               jax.random.key(0))
    assert eos.decode_steps == int(eos.lengths.max()) - 1 == ref.index(ref[3])


def test_decode_tail_on_a_quarter_of_the_rows_changes_no_token(params2: dict) -> None:
    """The tail of a call (nothing waits, the live rows fit in a quarter of the rows) decodes on that quarter:
    the same tokens and log-probs as decoding every row to the end, and the rows it computed add up."""
    sp = SamplingParams(temperature=1.0)
    prompts = _prompts((5, 9, 3, 17, 6, 11, 4, 8), QWEN2.vocab_size, seed=4)
    budgets = [5, 5, 20, 5, 5, 5, 20, 5]  # 8 rows of G 2; after 4 steps two rows are live: the tail's 2
    on = _sampler(params2, QWEN2, 4, sp, tail_rows="on").generate(prompts, 2, budgets, jax.random.key(3))
    off = _sampler(params2, QWEN2, 4, sp, tail_rows="off").generate(prompts, 2, budgets, jax.random.key(3))
    np.testing.assert_array_equal(on.tokens, off.tokens)
    np.testing.assert_allclose(on.policy_logprobs, off.policy_logprobs, atol=1e-5, rtol=1e-5)
    assert on.lengths.tolist() == off.lengths.tolist() == [b for b in budgets for _ in range(2)]
    assert on.decode_steps == off.decode_steps == 19 and on.decode_rows == off.decode_rows == 16
    assert off.decode_row_steps == 19 * 16
    assert on.decode_row_steps == 4 * 16 + 15 * 4  # 4 steps on every row, then 15 on the tail's 2 rows of 2
    assert on.row_utilisation == 1.0 == (12 * 4 + 4 * 19) / on.decode_row_steps
    # with EOS ending samples anywhere and rows finishing in any order, still the same samples
    ref = naive_greedy(params2, QWEN2, prompts, budgets)
    eos = (ref[0][2], ref[5][3])
    on = _sampler(params2, QWEN2, 4, GREEDY, eos=eos, tail_rows="on").generate(prompts, 1, budgets,
                                                                              jax.random.key(0))
    off = _sampler(params2, QWEN2, 4, GREEDY, eos=eos, tail_rows="off").generate(prompts, 1, budgets,
                                                                                jax.random.key(0))
    np.testing.assert_array_equal(on.tokens, off.tokens)
    assert on.finish_reason.tolist() == off.finish_reason.tolist() and on.lengths.tolist() == off.lengths.tolist()
    with pytest.raises(SamplerError, match="tail_rows must be one of"):
        SamplerConfig(tail_rows="sometimes")


# ---- 5. one prefill per group, shared prefix pages -------------------------------------------------------
def test_prefix_prefilled_once_and_pages_shared(params2: dict) -> None:
    page = 4
    prompts = _prompts(PROMPT_LENS, QWEN2.vocab_size)
    sampler = _sampler(params2, QWEN2, page)
    res = sampler.generate(prompts, G, list(BUDGETS), jax.random.key(0))
    assert res.prefilled_tokens == sum(PROMPT_LENS)
    plan = sampler.last_plan
    used: list[int] = []
    for g, grp in enumerate(plan.groups):
        P = PROMPT_LENS[g]
        tables = [grp.pages.table(i) for i in range(G)]
        full = P // page
        assert all(t[:full] == tables[0][:full] for t in tables)  # the same prefix pages in all G tables
        partial = [t[full] for t in tables] if P % page else []
        assert len(set(partial)) == len(partial)  # the partial page is copied per sample
        privates = [tuple(t[full:]) for t in tables]
        assert len({p for priv in privates for p in priv}) == sum(len(p) for p in privates)
        assert all(len(t) * page >= P + BUDGETS[g] - 1 for t in tables)
        used += tables[0][:full] + [p for priv in privates for p in priv]
    assert len(used) == len(set(used))  # no page shared across groups or double-booked
    shared, private = group_page_counts(23, [10] * G, page)
    assert shared == 5 and private == [3] * G  # 23 + 10 - 1 = 32 positions -> 8 pages, 5 full prompt pages


# ---- 7. pool limits -------------------------------------------------------------------------------------
def test_pool_limits_are_clean(params2: dict) -> None:
    """A group larger than the pool is refused before anything is allocated; bad input after planning gives
    every page back; a batch larger than the pool runs in refills (tests/test_sampler_dp.py checks tokens)."""
    sampler = _sampler(params2, QWEN2, 4, num_pages=64)
    prompts = _prompts(PROMPT_LENS, QWEN2.vocab_size)
    free = sampler.num_free_pages
    with pytest.raises(PoolExhaustedError, match="page pool exhausted: group 0 .* needs 72 pages.*has 64"):
        sampler.generate(prompts[:1], 8, 33, jax.random.key(0))  # 8 x ceil(33 / 4) = 72 private pages
    assert sampler.num_free_pages == free
    with pytest.raises(SamplerError, match="prompt 1: token id out of range"):
        sampler.generate([[1, 2], [3, 99]], 2, 3, jax.random.key(0))
    with pytest.raises(SamplerError, match="max_new_tokens must be an int >= 1"):
        sampler.generate([[1, 2]], 2, 0, jax.random.key(0))
    with pytest.raises(ValueError, match="sampler key: expected"):
        sampler.generate([[1, 2]], 2, 3, jnp.zeros((3,), jnp.uint32))
    assert sampler.num_free_pages == free


def test_no_recompile_for_new_weights_or_lengths_in_bucket(params2: dict) -> None:
    from poer_jax.sampler.sharded import decode_segment, prefill_insert

    sampler = _sampler(params2, QWEN2, 4)
    sampler.generate(_prompts((5, 9), QWEN2.vocab_size), 2, [6, 7], jax.random.key(0))
    sizes = (decode_segment._cache_size(), prefill_insert._cache_size())
    sampler.update_params(_params(QWEN2, seed=5))  # new weights: a jit argument, not a constant
    # other lengths, same buckets (prefill 12 tokens, 2 shared + 2 private pages, 8 output columns)
    res = sampler.generate(_prompts((6, 10), QWEN2.vocab_size), 2, [7, 5], jax.random.key(1))
    assert (decode_segment._cache_size(), prefill_insert._cache_size()) == sizes
    ref = naive_greedy(_params(QWEN2, seed=5), QWEN2, _prompts((6, 10), QWEN2.vocab_size), [7, 5])
    assert res.tokens[0].tolist() == ref[0] and res.tokens[2, :5].tolist() == ref[1]
    # a training step's cycle (release the pool for the update, new weights, sample) compiles nothing: the pool is
    # rebuilt by the programs of the first rebuild (a new jit each time compiled on every step, 0.25 s on the demo)
    new = _params(QWEN2, seed=6)
    compiles: list[list[str]] = []

    def listener(event: str, secs: float, **kw: object) -> None:
        if event.endswith("backend_compile_duration"):
            compiles[-1].append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for _ in range(2):
            compiles.append([])
            sampler.release()
            sampler.update_params(new)
            sampler.generate(_prompts((6, 10), QWEN2.vocab_size), 2, [7, 5], jax.random.key(2))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles[-1] == []


def test_allocator_refcounts_and_all_or_nothing() -> None:
    alloc = PageAllocator(10)
    groups = allocate_groups(
        alloc, [5, 8], [[3, 3], [1]], page_size=4
    )  # g0: 1 shared + 2x1; g1: 2 shared + 0
    assert alloc.num_free == 10 - 5
    assert alloc.refcount(groups[0].shared[0]) == 2
    with pytest.raises(PoolExhaustedError):
        allocate_groups(alloc, [4, 40], [[1], [1]], page_size=4)
    assert alloc.num_free == 5
    for grp in groups:
        grp.release(alloc)
    assert alloc.num_free == 10 and all(alloc.refcount(p) == 0 for p in range(10))
    with pytest.raises(SamplerError, match="released more often"):
        alloc.release([0])


# ---- paged attention kernel vs dense attention -----------------------------------------------------------
@pytest.mark.parametrize("page,chunk,dynamic", [(1, 4, True), (4, 2, True), (4, 8, True), (4, 2, False)])
def test_paged_attention_matches_dense(page: int, chunk: int, dynamic: bool) -> None:
    out, ref = _paged_vs_dense(page, chunk, dynamic)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _paged_vs_dense(page: int, chunk: int, dynamic: bool) -> tuple[jax.Array, jax.Array]:
    B, Hq, Hkv, hd, L, N, Pw = 3, 4, 2, 8, 2, 40, 8
    ks = jax.random.split(jax.random.key(3), 6)
    k_pages = jax.random.normal(ks[0], (L, Hkv, N, page, hd))
    v_pages = jax.random.normal(ks[1], (L, Hkv, N, page, hd))
    q = jax.random.normal(ks[2], (B, Hq, hd))
    k_cur, v_cur = jax.random.normal(ks[3], (B, Hkv, hd)), jax.random.normal(ks[4], (B, Hkv, hd))
    table = jax.random.permutation(ks[5], N)[: B * Pw].reshape(B, Pw)
    lengths = jnp.array([0, 3, min(Pw * page - 1, 29)])
    out = paged_decode_attention(
        q, k_cur, v_cur, k_pages, v_pages, jnp.int32(1), table, lengths, chunk, dynamic
    )
    dense = [
        x[1][:, table].transpose(1, 2, 3, 0, 4).reshape(B, Pw * page, Hkv, hd) for x in (k_pages, v_pages)
    ]
    k = jnp.concatenate([dense[0], k_cur[:, None]], 1)
    v = jnp.concatenate([dense[1], v_cur[:, None]], 1)
    t = jnp.arange(Pw * page + 1)
    allowed = ((t[None] < lengths[:, None]) | (t[None] == Pw * page))[:, None, :]
    return out, dense_attention(q[:, None], k, v, allowed)[:, 0]


@pytest.mark.parametrize("page,chunk,dynamic", [(4, 2, True), (2, 4, False), (4, 1, True)])
def test_cascade_attention_matches_dense(page: int, chunk: int, dynamic: bool) -> None:
    out, ref = _cascade_vs_dense(page, chunk, dynamic)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _cascade_vs_dense(page: int, chunk: int, dynamic: bool) -> tuple[jax.Array, jax.Array]:
    """2 groups x 3 samples; group prefixes of 2 and 0 full pages; private tables of 4 pages."""
    Ng, G, Hq, Hkv, hd, L, N, Ps, Pp = 2, 3, 4, 2, 8, 2, 64, 4, 4
    B = Ng * G
    ks = jax.random.split(jax.random.key(4), 6)
    k_pages = jax.random.normal(ks[0], (L, Hkv, N, page, hd))
    v_pages = jax.random.normal(ks[1], (L, Hkv, N, page, hd))
    q = jax.random.normal(ks[2], (B, Hq, hd))
    k_cur, v_cur = jax.random.normal(ks[3], (B, Hkv, hd)), jax.random.normal(ks[4], (B, Hkv, hd))
    perm = jax.random.permutation(ks[5], N)
    shared = SharedPrefix(perm[: Ng * Ps].reshape(Ng, Ps), jnp.array([2 * page, 0]))
    private = perm[Ng * Ps : Ng * Ps + B * Pp].reshape(B, Pp)
    start = jnp.repeat(shared.lengths, G)
    lengths = start + jnp.array([0, 1, 3 * page, page + 1, 0, Pp * page - 1])
    out = paged_decode_attention(
        q, k_cur, v_cur, k_pages, v_pages, jnp.int32(1), private, lengths, chunk, dynamic, shared, chunk
    )
    # dense reference: each row's table = its group's prefix pages, then its private pages
    full = jnp.concatenate([jnp.repeat(shared.table, G, axis=0), private], axis=1)  # [B, Ps + Pp]
    pos = jnp.concatenate(
        [jnp.broadcast_to(jnp.arange(Ps * page), (B, Ps * page)), start[:, None] + jnp.arange(Pp * page)], 1
    )
    valid = jnp.concatenate(
        [jnp.arange(Ps * page)[None] < start[:, None], pos[:, Ps * page :] < lengths[:, None]], 1
    )
    dense = [x[1][:, full].transpose(1, 2, 3, 0, 4).reshape(B, -1, Hkv, hd) for x in (k_pages, v_pages)]
    k = jnp.concatenate([dense[0], k_cur[:, None]], 1)
    v = jnp.concatenate([dense[1], v_cur[:, None]], 1)
    allowed = jnp.concatenate([valid, jnp.ones((B, 1), bool)], 1)[:, None, :]
    return out, dense_attention(q[:, None], k, v, allowed)[:, 0]


# ---- JetStream-shaped engine == batch sampler ------------------------------------------------------------
def test_engine_prefill_insert_generate(params2: dict) -> None:
    sp = SamplingParams(temperature=1.0, top_p=0.9)  # sampled: also checks the per-sample key scheme
    scfg = SamplerConfig(
        page_size=4, num_pages=16, max_slots=8, max_pages_per_seq=8, attn_chunk_pages=2, sampling=sp
    )
    engine = PagedEngine(QWEN2, scfg)
    prompt = _prompts((13,), QWEN2.vocab_size)[0]
    key = jax.random.key(5)
    state = engine.init_decode_state()
    prefix, first = engine.prefill(
        params=params2,
        padded_tokens=prompt + [0] * 3,
        true_length=13,
        key=jax.random.fold_in(key, 0),
        num_samples=3,
    )
    slots = [5, 1, 6]
    with pytest.raises(PoolExhaustedError, match="page pool exhausted"):
        engine.bulk_insert(prefix, state, slots, 20)  # 3 shared + 3 x 5 private > 16 pages
    assert engine.allocator.num_free == 16
    state = engine.bulk_insert(prefix, state, slots, 9)
    got = {s: [int(first.tokens[i])] for i, s in enumerate(slots)}
    lps = {s: [float(first.policy_logprobs[i])] for i, s in enumerate(slots)}
    for _ in range(8):
        state, rt = engine.generate(params2, state)
        for s in slots:
            if bool(rt.valid[s]):
                got[s].append(int(rt.tokens[s]))
                lps[s].append(float(rt.policy_logprobs[s]))
    ref = _sampler(params2, QWEN2, 4, sp).generate([prompt], 3, 9, key)
    for i, s in enumerate(slots):
        assert got[s] == ref.tokens[i].tolist()
        np.testing.assert_allclose(lps[s], ref.policy_logprobs[i], atol=1e-5)
    for s in slots:
        state = engine.free_resource(s, state)
    assert engine.allocator.num_free == 16 and not bool(state.active.any())

"""Data-parallel, budgeted, continuous-batching group sampler.

Token for token: a pool too small for the whole call (samples wait and refill slots as others finish), on
1 and on 8 devices (each with its own eighth of the pool; data-parallel only, and data-parallel x tensor),
gives what one device with a pool for everything gives (greedy: what full recompute gives), with ragged
prompts, shared prefixes, GQA, ragged budgets, EOS.
Pages all come back after every call and after a failure. Host-side scheduling, the KV budget keys and the
sampler's compiled programs for the plan command are checked without running a model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poer_jax.model.sharding import make_mesh, shard_params
from poer_jax.sampler import FINISH_BUDGET, FINISH_EOS, GroupSampler, SamplerConfig, SamplerError, SamplingParams
from poer_jax.sampler.pages import PageAllocator
from poer_jax.sampler.scheduler import NO_REFILL, CallShapes, Scheduler, assign_shards, plan_groups
from tests.test_sampler import QWEN2, _params, _prompts, naive_greedy

LENS = (1, 4, 5, 16, 17, 23, 9, 30, 2, 12, 7, 21, 3, 8, 26, 13)  # on / off page boundaries (page 4)
BUDGETS = [6, 9, 3, 12, 7, 10, 2, 5, 11, 4, 8, 6, 1, 9, 3, 7]
G = 3
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9)


def _mesh8(tensor: int = 1):
    return make_mesh({"data": 2, "fsdp": 4 // tensor, "tensor": tensor}, jax.devices()[:8])


def _sampler(params, sp, *, num_pages, max_slots=64, mesh=None, eos=(), fixed_tables=False,
             matmul_kernel="auto", tail_rows="auto") -> GroupSampler:
    scfg = SamplerConfig(page_size=4, num_pages=num_pages, max_slots=max_slots, max_pages_per_seq=16,
                         max_prefill_length=32, attn_chunk_pages=2, eos_ids=tuple(eos), sampling=sp,
                         fixed_tables=fixed_tables, matmul_kernel=matmul_kernel, tail_rows=tail_rows)
    return GroupSampler(params, QWEN2, scfg, mesh=mesh)


@pytest.fixture(scope="module")
def setup():
    params = _params(QWEN2)
    prompts = _prompts(LENS, QWEN2.vocab_size, seed=3)
    return params, prompts


@pytest.fixture(scope="module")
def greedy_ref(setup):
    params, prompts = setup
    return naive_greedy(params, QWEN2, prompts, BUDGETS)


@pytest.fixture(scope="module")
def sampled_ref(setup):
    """One device, a pool for the whole call: one prefill round, one decode segment. XLA's products, as with a
    tensor axis (the packed CPU kernel sums in another order: its own test, test_packed_matmul.py)."""
    params, prompts = setup
    sampler = _sampler(params, SAMPLED, num_pages=512, eos=(5, 11), matmul_kernel="xla")
    res = sampler.generate(prompts, G, BUDGETS, jax.random.key(4))
    assert res.decode_segments == 1 and res.refills == 0
    assert (res.finish_reason == FINISH_EOS).any() and (res.finish_reason == FINISH_BUDGET).any()
    return res


def _pool_is_split(sampler: GroupSampler, batch_devices: int, head_split: int = 1) -> None:
    """Each of the 8 devices holds 1/8 of the pool: its own num_pages pages (of batch_devices x num_pages)
    and 1/head_split of the KV heads."""
    k, n = sampler._pages()[0], sampler.scfg.num_pages
    assert k.shape[2] == batch_devices * n
    shards = k.addressable_shards
    assert len(shards) == 8 and all(s.data.size * 8 == k.size for s in shards)
    assert all(s.data.shape[1:3] == (k.shape[1] // head_split, n) for s in shards)
    assert {s.index[2].start for s in shards} == {d * n for d in range(batch_devices)}


@pytest.mark.parametrize("devices", [1, 8])
def test_small_pool_greedy_equals_full_recompute(setup, greedy_ref, devices):
    """1 device: 2 rows of 3 slots and 30 pages for 16 groups; 8 devices: 2 groups each, one at a time, page
    tables as wide as the config allows (``fixed_tables``)."""
    params, prompts = setup
    sampler = (_sampler(params, SamplingParams(temperature=0.0), num_pages=30, max_slots=6) if devices == 1 else
               _sampler(params, SamplingParams(temperature=0.0), num_pages=20, max_slots=3, mesh=_mesh8(),
                        fixed_tables=True))
    res = sampler.generate(prompts, G, BUDGETS, jax.random.key(0))
    for r in range(len(prompts) * G):
        assert res.tokens[r, : res.lengths[r]].tolist() == greedy_ref[r // G], (devices, r)
    assert (res.lengths == np.repeat(BUDGETS, G)).all()
    assert res.refills >= (7 if devices == 1 else 1) and res.decode_segments == res.refills + 1
    assert res.decoded_tokens == sum(b - 1 for b in BUDGETS) * G
    assert sampler.num_free_pages == devices * sampler.scfg.num_pages
    if devices == 8:
        assert sampler.last_plan.shapes.table_width == 16 and sampler.last_plan.shapes.shared_width == 8
        _pool_is_split(sampler, 8)
        for x in jax.tree.leaves(sampler.params):  # decode layout: whole weights on every device
            assert x.sharding.is_fully_replicated
        assert sorted(grp.shard for grp in sampler.last_plan.groups) == sorted(list(range(8)) * 2)


def test_eight_devices_small_pool_sampled_equals_one_device(setup, sampled_ref):
    """Seeded top-p sampling with EOS on data 2 x fsdp 2 x tensor 2: the 4 devices of the batch axes get 4
    groups each and hold one at a time (refilled as the previous finishes) in their own pages, the KV heads
    split over 'tensor' (each device: 1/8 of the pool); the samples equal one device with a pool for all."""
    params, prompts = setup
    sampler = _sampler(params, SAMPLED, num_pages=20, max_slots=3, mesh=_mesh8(tensor=2), eos=(5, 11))
    res = sampler.generate(prompts, G, BUDGETS, jax.random.key(4))
    np.testing.assert_array_equal(res.tokens, sampled_ref.tokens)
    np.testing.assert_array_equal(res.lengths, sampled_ref.lengths)
    np.testing.assert_array_equal(res.finish_reason, sampled_ref.finish_reason)
    np.testing.assert_allclose(res.policy_logprobs, sampled_ref.policy_logprobs, atol=1e-5)
    np.testing.assert_allclose(res.logprobs, sampled_ref.logprobs, atol=1e-5)
    assert res.refills >= 3 and sampler.last_plan.shapes.rows == 1
    assert sampler.num_free_pages == 4 * 20
    _pool_is_split(sampler, 4, head_split=2)
    for x in jax.tree.leaves(sampler.params):  # decode layout: nothing split over the batch axes
        assert not {"data", "fsdp"} & set(jax.tree.leaves(tuple(x.sharding.spec)))


def test_decode_tail_on_eight_devices_changes_no_token(setup):
    """The tail phase on 8 devices of the batch axes (4 rows of G 3 each: a tail of 1 row once every device's
    live rows fit, decided with a max over the devices): the same samples as decoding every row to the end."""
    params, prompts = setup
    many = prompts + _prompts(LENS, QWEN2.vocab_size, seed=9)
    budgets = [16] * 8 + [2] * 24  # one long group per device (groups go out by tokens), the rest done early
    res = {mode: _sampler(params, SAMPLED, num_pages=64, mesh=_mesh8(), eos=(5, 11), tail_rows=mode).generate(
        many, G, budgets, jax.random.key(4)) for mode in ("on", "off")}
    on, off = res["on"], res["off"]
    np.testing.assert_array_equal(on.tokens, off.tokens)
    np.testing.assert_array_equal(on.finish_reason, off.finish_reason)
    np.testing.assert_allclose(on.policy_logprobs, off.policy_logprobs, atol=1e-5, rtol=1e-5)
    assert on.decode_steps == off.decode_steps and on.decode_rows == off.decode_rows == 8 * 4 * G
    assert off.decode_row_steps == off.decode_steps * off.decode_rows
    assert on.decode_row_steps < off.decode_row_steps  # the tail ran on a quarter of the rows


def test_release_frees_weights_and_pool_until_the_next_update(setup, sampled_ref):
    """The trainer releases the sampler's copy for the update (no reference kept: the memory returns), a call
    before update_params is refused, and after it the samples are as before (pool rebuilt)."""
    params, prompts = setup
    sampler = _sampler(params, SAMPLED, num_pages=20, max_slots=3, mesh=_mesh8(tensor=2), eos=(5, 11))
    sampler.generate(prompts, G, BUDGETS, jax.random.key(4))
    assert sampler._pool is not None
    sampler.release()
    assert sampler.params is None and sampler._pool is None  # the sampler holds no reference to either
    with pytest.raises(SamplerError, match="released"):
        sampler.generate(prompts, G, BUDGETS, jax.random.key(4))
    sampler.update_params(params)
    res = sampler.generate(prompts, G, BUDGETS, jax.random.key(4))
    np.testing.assert_array_equal(res.tokens, sampled_ref.tokens)
    _pool_is_split(sampler, 4, head_split=2)


def test_failure_midway_returns_every_page(setup, sampled_ref, monkeypatch):
    """A decode segment that fails after a refill leaves no page taken; the next call is unaffected."""
    import poer_jax.sampler.batch_sampler as bs

    params, prompts = setup
    sampler = _sampler(params, SAMPLED, num_pages=20, max_slots=3, mesh=_mesh8(tensor=2), eos=(5, 11))
    real, calls = bs.decode_segment, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(bs, "decode_segment", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        sampler.generate(prompts, G, BUDGETS, jax.random.key(4))
    assert sampler.num_free_pages == 4 * 20
    monkeypatch.setattr(bs, "decode_segment", real)
    res = sampler.generate(prompts, G, BUDGETS, jax.random.key(4))
    np.testing.assert_array_equal(res.tokens, sampled_ref.tokens)
    assert sampler.num_free_pages == 4 * 20


# ---- host side: placement, admission, release (no model) -------------------------------------------------
def test_groups_balanced_over_devices_by_tokens():
    costs = [100, 7, 7, 50, 50, 3, 90, 10, 10, 40]
    shards = assign_shards(costs, 3)
    load = [sum(c for c, s in zip(costs, shards, strict=True) if s == d) for d in range(3)]
    assert max(load) - min(load) <= max(costs)  # longest-processing-time bound
    assert load == [120, 130, 117]
    groups = plan_groups([np.ones(n, np.int32) for n in (5, 9, 2, 30)], [4, 4, 40, 1], 2, 4, 2, 64)
    assert [g.shard for g in groups] == [1, 1, 0, 1] and [g.out_group for g in groups] == [0, 1, 0, 2]
    with pytest.raises(SamplerError, match="group 2 .* needs 22 pages, a device's pool has 21"):
        plan_groups([np.ones(n, np.int32) for n in (5, 9, 2)], [4, 4, 40], 2, 4, 2, 21)


def test_scheduler_frees_pages_as_samples_finish_and_refills_rows():
    """One device, 2 rows of G = 2, a 12-page pool: private pages come back when a sample finishes, the
    shared prompt pages when the group's last sample does; the row then takes the next waiting group."""
    G, page = 2, 4
    prompts = [np.ones(n, np.int32) for n in (8, 8, 8)]  # 2 shared pages + 2 x 2 private (budget 9) = 6 each
    groups = plan_groups(prompts, [9, 9, 9], G, page, 1, 12)
    alloc = PageAllocator(12)
    shapes = CallShapes(G, rows=2, out_groups=3, out_width=9, table_width=2, chunk_pages=2, shared_width=2,
                        shared_chunk_pages=2, prefill_len=8, prefill_rows=2)
    sched = Scheduler(groups, [alloc], shapes, page, pad_id=0, group_offset=10, refill_fraction=0.5)
    first = sched.admit()
    assert [g.index for g in first[0]] == [0, 1] and alloc.num_free == 0 and sched.pending == 1
    (batch,) = sched.prefill_batches(first, 12)
    assert batch["group_ids"].tolist() == [10, 11] and batch["insert.slot"].tolist() == [0, 1, 2, 3]
    ctl = sched.control()
    assert ctl["next_need"].tolist() == [6] and ctl["slot_pages"].tolist() == [2, 2, 2, 2]
    assert ctl["row_pages"].tolist() == [2, 2] and int(ctl["target"]) == 1
    sched.release(np.array([True, False, True, True]))  # sample 1 of group 0 finished
    assert alloc.num_free == 2 and sched.free_rows == [[]]
    assert sched.admit() == [[]]  # 2 free pages < 6
    sched.release(np.array([False, False, True, True]))  # group 0 done: its 2 shared pages come back too
    assert alloc.num_free == 6 and sched.free_rows == [[0]]
    (refill,) = sched.admit()
    assert [g.index for g in refill] == [2] and refill[0].row == 0 and alloc.num_free == 0
    assert int(sched.control()["target"]) == NO_REFILL  # nothing waits: run every slot to its end
    sched.release_all()
    assert alloc.num_free == 12 and sched.done


# ---- weights laid out for decoding -----------------------------------------------------------------------
def test_decode_weights_bf16_replicated_over_batch_axes_one_reshard():
    """fp32 master weights in the trainer's FSDP layout -> bf16 compute-dtype weights whole on every device
    of the batch axes (split over 'tensor' only), in one jitted reshard that is reused after updates."""
    from poer_jax.system.multihost import ProcessLocalParams

    cfg = QWEN2.replace(dtype="bfloat16")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    trained = shard_params(_params(QWEN2), cfg, mesh)
    assert "fsdp" in str(trained["layers"]["q_proj"].sharding.spec)
    local = ProcessLocalParams(mesh, cfg)
    for seed in (0, 1):  # after an "update": same program
        out = local(shard_params(_params(QWEN2, seed), cfg, mesh))
        assert local._reshard._cache_size() == 1
    q = out["layers"]["q_proj"]
    assert q.dtype == jnp.bfloat16 and q.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
    np.testing.assert_array_equal(np.asarray(q, np.float32),
                                  np.asarray(jnp.asarray(_params(QWEN2, 1)["layers"]["q_proj"], jnp.bfloat16),
                                             np.float32))
    sampler = GroupSampler(_params(QWEN2), cfg, SamplerConfig(page_size=4, num_pages=8, layer_loop="scan"),
                           mesh=mesh)
    assert sampler.params["layers"]["q_proj"].dtype == jnp.bfloat16
    sampler.update_params(out)  # already laid out: kept as is, no copy
    assert sampler.params["layers"]["q_proj"] is q


def test_unrolled_sampler_holds_each_layers_weights_in_the_decode_layout():
    """layer_loop='unrolled' (the CPU default): the weights are sliced per layer once per update, each slice laid
    out as the stacked weight without its layer axis; ``params`` stacks them back to the same values."""
    cfg = QWEN2.replace(dtype="bfloat16")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    sampler = GroupSampler(_params(QWEN2), cfg, SamplerConfig(page_size=4, num_pages=8, layer_loop="unrolled"),
                           mesh=mesh)
    for seed in (0, 1):
        new = shard_params(_params(QWEN2, seed), cfg, mesh)
        sampler.update_params(new)
        layers = sampler._weights["layers"]
        assert isinstance(layers, tuple) and len(layers) == QWEN2.num_layers
        for i, lp in enumerate(layers):
            q = lp["q_proj"]
            assert q.dtype == jnp.bfloat16 and q.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
            np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(
                jnp.asarray(_params(QWEN2, seed)["layers"]["q_proj"][i], jnp.bfloat16), np.float32))
        stacked = sampler.params
        assert stacked["layers"]["q_proj"].shape == new["layers"]["q_proj"].shape
        np.testing.assert_array_equal(np.asarray(stacked["layers"]["down_proj"], np.float32),
                                      np.asarray(new["layers"]["down_proj"].astype(jnp.bfloat16), np.float32))
    assert sampler._unstack._cache_size() == 1  # one slicing program, reused after every update
    sampler.release()
    assert sampler.params is None


# ---- the sampler's programs for the plan command -----------------------------------------------------------
def test_program_specs_compile_with_an_eighth_of_the_pool_per_device():
    from poer_jax.sampler.programs import sampler_program_specs

    scfg = SamplerConfig(page_size=4, num_pages=4096, max_slots=8, max_pages_per_seq=16, max_prefill_length=40)
    specs = sampler_program_specs(QWEN2, scfg, _mesh8(), group_size=4, prompt_len=40, max_new_tokens=24)
    assert [s.name for s in specs] == ["sampler/prefill", "sampler/decode"]
    pool_per_device = 2 * QWEN2.num_layers * QWEN2.num_kv_heads * 4096 * 4 * QWEN2.head_dim * 4  # K + V, fp32
    for spec in specs:
        assert "rollout.kv_cache_gb" in spec.sizing_keys and spec.num_shapes >= 1
        k_pages = spec.args[1].decode.k_pages
        assert k_pages.shape[2] == 8 * 4096 and k_pages.sharding.shard_shape(k_pages.shape)[2] == 4096
        mem = spec.fn.lower(*spec.args, **spec.kwargs).compile().memory_analysis()
        assert pool_per_device <= mem.argument_size_in_bytes < 1.1 * pool_per_device, spec.name
        assert mem.alias_size_in_bytes >= pool_per_device  # the pool is donated through both programs


# ---- the KV budget keys ------------------------------------------------------------------------------------
def test_kv_budget_keys_size_the_pool_per_device():
    """Pages per device from rollout.kv_cache_gb, capped at the device's share of the largest call; the
    num_pages override; a budget below one group, a fraction on a backend without memory stats and a
    non-positive budget fail naming the key."""
    from poer_jax.system.config import ConfigError, apply_overrides, default_config, validate
    from poer_jax.system.sampler import sampler_config

    def config(**kw):
        base = {"model.preset": "tiny", "data.train_path": "x.jsonl", "data.max_prompt_len": 12,
                "rollout.max_completion_len": 20, "rollout.page_size": 4, "data.questions_per_step": 16,
                "rollout.group_size": 3, "optim.micro_batches": 1, "cache.max_truncation": 4, **kw}
        return validate(apply_overrides(default_config(), [f"{k}={v}" for k, v in base.items()]))

    mesh = _mesh8()
    # 1 KiB per page (2 x 2 layers x 2 KV heads x 4 tokens x 8 x fp32); 9 pages per sequence (32 tokens + 1)
    # largest call per device: the cache fill, 48 / 8 = 6 prompts x (prompt + 1 sample) x 9 = 108 pages
    assert sampler_config(config(), QWEN2, mesh).num_pages == 108  # 16 GB: capped by the need
    scfg = sampler_config(config(**{"rollout.kv_cache_gb": 50e-6}), QWEN2, mesh)
    assert scfg.num_pages == 48 and scfg.max_slots == 8  # 50 KB / 1 KiB; 2 groups x 3 samples -> 8 slots
    assert sampler_config(config(**{"rollout.num_pages": 40}), QWEN2, mesh).num_pages == 40
    with pytest.raises(ConfigError, match="'rollout.kv_cache_gb'.*19 KV pages per device.*one group"):
        sampler_config(config(**{"rollout.kv_cache_gb": 20e-6}), QWEN2, mesh)  # one group: 4 x 9 = 36 pages
    with pytest.raises(ConfigError, match="'rollout.kv_cache_fraction'.*give the budget in GB"):
        sampler_config(config(**{"rollout.kv_cache_fraction": 0.5}), QWEN2, mesh)  # CPU reports no memory
    assert sampler_config(config(**{"rollout.kv_cache_fraction": 0.5}), QWEN2, mesh, free_bytes=1e5).num_pages == 48
    assert not sampler_config(config(), QWEN2, mesh).fixed_tables
    assert sampler_config(config(), QWEN2, mesh).max_slots == 8  # the cache fill: 48 / 8 = 6 prompts -> 8 slots
    assert sampler_config(config(**{"rollout.max_decode_slots": 2}), QWEN2, mesh).max_slots == 4  # >= a group
    assert sampler_config(config(**{"rollout.fixed_page_tables": True}), QWEN2, mesh).fixed_tables
    for key in ("rollout.kv_cache_gb", "rollout.kv_cache_fraction"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config(**{key: 0})


@pytest.mark.parametrize("n, size", [(160, 64), (129, 64), (128, 64), (8, 64), (1, 1), (7, 3), (0, 5)])
def test_even_batches_cover_every_item_in_the_fewest_batches_of_near_equal_size(n, size):
    """``pages.even_batches``: consecutive, covering 0..n once, ceil(n / size) batches, none over ``size``, sizes
    within one of each other (a short last batch would compile a program of its own)."""
    from poer_jax.sampler.pages import even_batches

    batches = even_batches(n, size)
    assert len(batches) == -(-n // size)
    assert [i for a, b in batches for i in range(a, b)] == list(range(n))
    sizes = [b - a for a, b in batches]
    assert all(0 < s <= size for s in sizes) and (not sizes or max(sizes) - min(sizes) <= 1)
    with pytest.raises(ValueError, match="batch_size"):
        even_batches(n, 0)

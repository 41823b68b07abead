"""The sampler's compiled programs, described abstractly for the plan command (``poer_jax.plan``).

``sampler_program_specs`` returns the group sampler's two jitted programs at the shapes of a training step:
``sampler/prefill`` (``_prefill_insert``: one chunk of group prompts prefilled and inserted into the decode
slots) and ``sampler/decode`` (``_decode_jit``: the whole decode ``while_loop``), with abstract arguments
laid out as ``GroupSampler`` lays them on ``mesh``. Nothing is allocated. The shapes follow
``GroupSampler.plan``: prompts of ``prompt_len`` tokens and budgets of ``max_new_tokens``, as many groups
as the sampler's slots hold (``SamplerConfig.max_slots // group_size``, bucketed down).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from poer_jax.model.config import QwenConfig, dtype_from_name
from poer_jax.model.qwen import param_shapes
from poer_jax.model.sharding import param_shardings
from poer_jax.plan.spec import RESIDENT_KV_POOL, RESIDENT_TRAIN_STATE, ProgramSpec
from poer_jax.sampler.batch_sampler import _decode_jit, _prefill_insert
from poer_jax.sampler.engine import DecodeState, InsertArrays, Outputs
from poer_jax.sampler.paged_attention import (
    SharedPrefix,
    attention_chunk_pages,
    dynamic_attention_chunks,
    kv_sharding,
    pool_shape,
)
from poer_jax.sampler.pages import (
    SamplerConfig,
    group_page_counts,
    pow2_bucket,
    prefill_bucket,
    round_up,
    shape_bucket,
)


def _bucket_floor(n: int) -> int:
    """The largest ``shape_bucket`` value <= n (n >= 1)."""
    best = 1
    for m in range(1, n + 1):
        b = shape_bucket(m)
        if b <= n:
            best = max(best, b)
    return best


def _buckets(lo: int, hi: int, fn: Any) -> int:
    return len({fn(n) for n in range(lo, hi + 1)})


def sampler_program_specs(mcfg: QwenConfig, scfg: SamplerConfig, mesh: Mesh, *, group_size: int,
                          prompt_len: int, max_new_tokens: int) -> list[ProgramSpec]:
    """[sampler/prefill, sampler/decode] of the current ``GroupSampler`` at these shapes (module docstring).

    The sampler's weights are the trained weights resharded onto the sampler's mesh: on one process the very
    buffers of the train state, so they are named as part of ``RESIDENT_TRAIN_STATE``.
    """
    G, page = int(group_size), scfg.page_size
    rep = NamedSharding(mesh, P())

    def sds(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding = rep) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    p_sh = param_shardings(mcfg, mesh)
    params = jax.tree.map(lambda shape, sh: sds(shape, mcfg.jnp_param_dtype, sh), param_shapes(mcfg), p_sh,
                          is_leaf=lambda x: isinstance(x, tuple))
    kv_shard = kv_sharding(mcfg, mesh)
    kv_dtype = dtype_from_name(scfg.kv_dtype or mcfg.dtype)
    pages = sds(pool_shape(mcfg, scfg), kv_dtype, kv_shard or rep)
    chunk_pages = attention_chunk_pages(scfg, mesh)

    groups = shape_bucket(_bucket_floor(max(1, scfg.max_slots // G)))
    S = groups * G
    shared_n, private_n = group_page_counts(prompt_len, [max_new_tokens], page)
    private = shape_bucket(private_n[0])
    shared = shape_bucket(max(shared_n, 1))
    chunk, shared_chunk = min(chunk_pages, private), min(chunk_pages, shared)
    width = round_up(private, chunk)
    out_width = shape_bucket(max_new_tokens)
    T = prefill_bucket(prompt_len, page)
    per_call = min(pow2_bucket(groups), 1 << max(scfg.max_prefill_tokens // T, 1).bit_length() - 1)
    E = pow2_bucket(per_call * G)

    i32 = jnp.int32
    state = DecodeState(pages, pages, sds((S, width), i32), sds((S,), i32), sds((S,), i32), sds((S,), i32),
                        sds((S,), i32), sds((S,), jnp.bool_), sds((S,), i32), sds((S, 2), jnp.uint32))
    out = Outputs(sds((S, out_width), i32), sds((S, out_width), jnp.float32), sds((S, out_width), jnp.float32))
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    arrays = InsertArrays(sds((per_call, T // page), i32), sds((E,), i32), sds((E, width), i32), sds((E,), i32),
                          sds((E,), i32), sds((E,), i32), sds((E,), i32))
    prefill = ProgramSpec(
        name="sampler/prefill", fn=_prefill_insert,
        args=(params, state, out, sds((per_call, T), i32), sds((per_call,), i32), key, sds((), jnp.uint32), arrays),
        kwargs=dict(cfg=mcfg, sp=scfg.sampling, group_size=G, eos_ids=scfg.eos_ids, kv_dtype=kv_dtype,
                    kv_shard=kv_shard),
        sizing_keys=("data.max_prompt_len", "rollout.max_completion_len", "rollout.num_pages", "model.attention"),
        num_shapes=_prefill_shapes(prompt_len, groups, scfg),
        note=f"{per_call} prompts x T={T} per call, {S} slots, pool {scfg.num_pages} pages of {page}",
        resident={RESIDENT_TRAIN_STATE: 0, RESIDENT_KV_POOL: 1},
    )
    shared_prefix = SharedPrefix(sds((groups, round_up(shared, shared_chunk)), i32), sds((groups,), i32))
    decode = ProgramSpec(
        name="sampler/decode", fn=_decode_jit, args=(params,),
        kwargs=dict(cfg=mcfg, state=state, out=out, sp=scfg.sampling, eos_ids=scfg.eos_ids, chunk_pages=chunk,
                    pad_id=scfg.pad_id, kv_shard=kv_shard, dynamic_chunks=dynamic_attention_chunks(scfg, mesh),
                    shared=shared_prefix, shared_chunk_pages=shared_chunk),
        sizing_keys=("data.questions_per_step", "rollout.group_size", "rollout.max_completion_len",
                     "rollout.num_pages"),
        num_shapes=_decode_shapes(prompt_len, max_new_tokens, groups, page, chunk_pages),
        note=f"{S} slots ({groups} groups x G={G}), page table {width} + shared {shared} pages, "
             f"out {out_width}; cost counts one loop iteration",
        resident={RESIDENT_TRAIN_STATE: 0, RESIDENT_KV_POOL: "state"},
    )
    return [prefill, decode]


def _prefill_shapes(prompt_len: int, groups: int, scfg: SamplerConfig) -> int:
    """Distinct (prompt bucket, prompts per call) pairs over prompts of 1..prompt_len tokens."""
    count = 0
    for T in {prefill_bucket(n, scfg.page_size) for n in range(1, prompt_len + 1)}:
        per = min(pow2_bucket(groups), 1 << max(scfg.max_prefill_tokens // T, 1).bit_length() - 1)
        count += per.bit_length()  # chunks of 1, 2, 4, ..., per prompts
    return count


def _decode_shapes(prompt_len: int, max_new: int, groups: int, page: int, chunk_pages: int) -> int:
    """Upper bound on distinct decode programs: slot counts x private widths x shared widths x output widths."""
    slots = _buckets(1, groups, shape_bucket)
    private = _buckets(1, -(-(prompt_len + max_new) // page) + 1, shape_bucket)
    shared = _buckets(1, max(prompt_len // page, 1), shape_bucket)
    out = _buckets(1, max_new, shape_bucket)
    return slots * private * shared * out

"""The group sampler the trainer calls: G continuations per prompt, each prompt prefilled once (Eq. 3).

``GroupSampler(params, cfg, sampler_cfg, mesh=None).generate(prompts, group_size, max_new_tokens, key)``
samples, for every prompt q_k || a_k^[0:-m] (question + cached answer prefix, as token ids), G continuations
o_i ~ pi_theta(. | q_k, a_k^[0:-m]) (paper Eq. 3) with a per-group budget of new tokens. A call runs:

  1. prefill + insert (one jitted program per chunk of at most ``max_prefill_tokens`` padded prompt tokens):
     one forward per group prompt; the prompt's full pages are written once and shared by the group's G page
     tables, its partial last page is copied per sample; G first tokens are sampled from that one forward's
     last logits;
  2. decode (one jitted program): a ``lax.while_loop`` over steps for all samples until each has hit EOS or
     its budget; no host sync until it returns. Attention is cascaded: each group's shared prefix pages are
     read once per step for all its G samples (one matmul with G x Hq/Hkv query rows), each sample's
     private pages (partial-page copy + its own tokens) separately, and the two softmaxes merged exactly.

Pages are allocated on the host before anything runs (a request that does not fit raises
``PoolExhaustedError`` with nothing changed) and freed when the call returns. Shapes are bucketed (powers of
two for prompt length, prompts per prefill, samples, page-table width, output width), so a training run
compiles a bounded set of programs; params are a jit argument, so ``update_params`` never recompiles. The KV
pool is donated through every program and kept between calls.

Outputs (numpy, rows = group-major samples, g * G + i):
  tokens [n, M]      generated ids, ``pad_id`` after each sample's end; M = the largest budget of the call.
                     A sample that stops on EOS keeps the EOS token as its last token.
  logprobs [n, M]    log-prob of each token under the distribution it was sampled from (after temperature,
                     top-k, top-p; 0 for greedy), 0 after the end.
  policy_logprobs    log_softmax(logits / T)[token] over the full vocabulary (T = temperature, 1 for
                     greedy): the trainer's log pi_theta(o_t | ...) at its temperature (ratios, KL).
  lengths [n], finish_reason [n] (FINISH_EOS = 1, FINISH_BUDGET = 2), prompt_lens [n], group [n]
  prefilled_tokens   sum of the groups' prompt lengths (each prompt prefilled once)
  decoded_tokens     tokens produced by decode steps (= sum(lengths) - n: first tokens come from prefill)
  decode_steps       iterations of the decode loop
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from poer_jax.model.config import QwenConfig, dtype_from_name
from poer_jax.model.qwen import Params
from poer_jax.model.sharding import replicated, shard_params
from poer_jax.sampler.engine import (
    DECODE_COMPILER_OPTIONS,
    DECODE_LOOP_STATIC,
    DecodeState,
    InsertArrays,
    Outputs,
    decode_loop,
    empty_state,
    insert_core,
    prefill_core,
    unroll_decode_layers,
)
from poer_jax.sampler.paged_attention import (
    SharedPrefix,
    attention_chunk_pages,
    attention_kernel,
    dynamic_attention_chunks,
    empty_pool,
    kv_sharding,
)
from poer_jax.sampler.pages import (
    GroupPages,
    PageAllocator,
    PageArrays,
    SamplerConfig,
    SamplerError,
    allocate_groups,
    build_page_arrays,
    group_page_counts,
    pow2_bucket,
    prefill_bucket,
    round_up,
    shape_bucket,
    validate_budget,
    validate_prompt,
)
from poer_jax.sampler.sampling import SamplingParams, as_key, sample_keys


@dataclasses.dataclass
class SampleOutput:
    """Result of ``GroupSampler.generate`` (see the module docstring for every field)."""

    tokens: np.ndarray
    logprobs: np.ndarray
    policy_logprobs: np.ndarray
    lengths: np.ndarray
    finish_reason: np.ndarray
    prompt_lens: np.ndarray
    group: np.ndarray
    prefilled_tokens: int
    decoded_tokens: int
    decode_steps: int

    @property
    def generated_tokens(self) -> int:
        return int(self.lengths.sum())


@dataclasses.dataclass
class CallPlan:
    """Host-side plan of one call: the groups' pages and bucketed shapes (kept as ``last_plan``)."""

    groups: list[GroupPages]
    prefill_len: int
    groups_per_prefill: int
    num_groups: int  # bucketed; slot g * G + i holds sample i of group g
    num_slots: int
    table_width: int  # private pages per sample
    chunk_pages: int
    shared_width: int  # shared prefix pages per group
    shared_chunk_pages: int
    out_width: int

    def shared_prefix(self) -> SharedPrefix:
        """Host arrays of the groups' shared prefix pages (cascade attention); padding rows are empty."""
        table = np.zeros((self.num_groups, self.shared_width), np.int32)
        lengths = np.zeros((self.num_groups,), np.int32)
        for g, grp in enumerate(self.groups):
            table[g, : len(grp.shared)] = grp.shared
            lengths[g] = len(grp.shared) * grp.page_size
        return SharedPrefix(table, lengths)


@partial(
    jax.jit,
    static_argnames=("cfg", "sp", "group_size", "eos_ids", "kv_dtype", "kv_shard"),
    donate_argnames=("state", "out"),
)
def _prefill_insert(
    params: Params,
    state: DecodeState,
    out: Outputs,
    tokens: jax.Array,
    true_lengths: jax.Array,
    key: jax.Array,
    first_group: jax.Array,
    arrays: InsertArrays,
    *,
    cfg: QwenConfig,
    sp: SamplingParams,
    group_size: int,
    eos_ids: tuple[int, ...],
    kv_dtype: Any,
    kv_shard: NamedSharding | None,
) -> tuple[DecodeState, Outputs]:
    """Prefill a chunk of groups (rows = groups first_group, first_group + 1, ...), insert their samples."""
    N = tokens.shape[0]
    groups = first_group + jnp.arange(N, dtype=jnp.uint32)
    group_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, groups)  # independent of the chunking
    prefix = prefill_core(
        params, cfg, tokens, true_lengths, sample_keys(group_keys, group_size), sp, kv_dtype
    )
    state = insert_core(prefix, state, arrays, eos_ids, kv_shard)
    first = [
        x[arrays.prefix, arrays.sample] for x in (prefix.tokens, prefix.logprobs, prefix.policy_logprobs)
    ]
    out = Outputs(
        *(o.at[arrays.slot, 0].set(f.astype(o.dtype), mode="drop") for o, f in zip(out, first, strict=True))
    )
    return state, out


_decode_jit = jax.jit(
    decode_loop,
    static_argnames=DECODE_LOOP_STATIC,
    donate_argnames=("state", "out"),
    compiler_options=DECODE_COMPILER_OPTIONS,
)


class GroupSampler:
    """Paged-KV group sampler; see the module docstring. Not thread-safe (one host-side allocator)."""

    def __init__(self, params: Params, cfg: QwenConfig, sampler_cfg: SamplerConfig, mesh: Mesh | None = None):
        self.cfg, self.scfg, self.mesh = cfg, sampler_cfg, mesh
        self.attention_kernel = attention_kernel(sampler_cfg, mesh)
        self.kv_shard = kv_sharding(cfg, mesh, self.attention_kernel)
        self.kv_dtype = dtype_from_name(sampler_cfg.kv_dtype or cfg.dtype)
        self.dynamic_chunks = dynamic_attention_chunks(sampler_cfg, mesh)
        self.chunk_pages = attention_chunk_pages(sampler_cfg, mesh)
        self.unroll_layers = unroll_decode_layers(sampler_cfg, mesh)
        self.allocator = PageAllocator(sampler_cfg.num_pages)
        self._device = min(jax.tree.leaves(params)[0].devices(), key=lambda d: d.id)  # used without a mesh
        self.params = self._place(params)
        self._pool: tuple[jax.Array, jax.Array] | None = None
        self.last_plan: CallPlan | None = None

    def _place(self, params: Params) -> Params:
        """Weights in one canonical placement, whatever produced them (``load_hf`` puts them on a one-device
        mesh, ``init_params`` on the default device): input shardings are part of a compiled program's key,
        so a call after ``update_params`` reuses the programs of the first call. Without a mesh everything
        lives on one device: the device of the weights given to the constructor."""
        if self.mesh is not None:
            return shard_params(params, self.cfg, self.mesh)
        return jax.device_put(params, SingleDeviceSharding(self._device))

    def update_params(self, params: Params) -> None:
        """Swap in new weights (same shapes / dtypes: the compiled programs are reused)."""
        self.params = self._place(params)

    def _pages(self) -> tuple[jax.Array, jax.Array]:
        if self._pool is None or any(p.is_deleted() for p in self._pool):
            placement = self._device if self.kv_shard is None else self.kv_shard
            self._pool = empty_pool(self.cfg, self.scfg, self.kv_dtype, self.attention_kernel, placement)
        return self._pool

    def plan(
        self, prompts: Sequence[Sequence[int]], group_size: int, max_new_tokens: int | Sequence[int]
    ) -> tuple[CallPlan, list[np.ndarray]]:
        """Validate, allocate pages (all or nothing), choose bucketed shapes. Returns (plan, prompts)."""
        s = self.scfg
        if int(group_size) != group_size or group_size < 1:
            raise SamplerError(f"group_size must be an int >= 1, got {group_size!r}")
        if not prompts:
            raise SamplerError("generate: no prompts")
        budgets = (
            [max_new_tokens] * len(prompts)
            if isinstance(max_new_tokens, (int, np.integer))
            else list(max_new_tokens)
        )
        if len(budgets) != len(prompts):
            raise SamplerError(f"max_new_tokens has {len(budgets)} entries for {len(prompts)} prompts")
        arrs = [validate_prompt(p, self.cfg, s, f"prompt {g}") for g, p in enumerate(prompts)]
        lens = [a.size for a in arrs]
        budgets = [
            validate_budget(n, b, s, f"prompt {g}")
            for g, (n, b) in enumerate(zip(lens, budgets, strict=True))
        ]
        counts = [group_page_counts(n, [b], s.page_size) for n, b in zip(lens, budgets, strict=True)]
        private = shape_bucket(max(c[1][0] for c in counts))
        shared = shape_bucket(max(c[0] for c in counts))  # at least 1: an empty prefix is masked by length
        chunk, shared_chunk = min(self.chunk_pages, private), min(self.chunk_pages, shared)
        T = prefill_bucket(max(lens), s.page_size)
        per_call = min(pow2_bucket(len(arrs)), 1 << max(s.max_prefill_tokens // T, 1).bit_length() - 1)
        num_groups = shape_bucket(len(arrs))
        groups = allocate_groups(self.allocator, lens, [[b] * group_size for b in budgets], s.page_size)
        plan = CallPlan(
            groups=groups,
            prefill_len=T,
            groups_per_prefill=per_call,
            num_groups=num_groups,
            num_slots=num_groups * int(group_size),
            table_width=round_up(private, chunk),
            chunk_pages=chunk,
            shared_width=round_up(shared, shared_chunk),
            shared_chunk_pages=shared_chunk,
            out_width=shape_bucket(max(budgets)),
        )
        return plan, arrs

    def _chunk_arrays(
        self, plan: CallPlan, arrs: list[np.ndarray], G: int
    ) -> list[tuple[int, np.ndarray, np.ndarray, PageArrays]]:
        """Per prefill call: (first group, tokens [N, T], true lengths [N], insert arrays); sample i of
        group g goes to slot g * G + i."""
        s, T, per = self.scfg, plan.prefill_len, plan.groups_per_prefill
        chunks = []
        for g0 in range(0, len(arrs), per):
            part = arrs[g0 : g0 + per]
            N = pow2_bucket(len(part))
            tokens = np.full((N, T), s.pad_id, np.int32)
            true_lens = np.zeros((N,), np.int32)
            for j, a in enumerate(part):
                tokens[j, : a.size], true_lens[j] = a, a.size
            slots = [(g0 + j) * G + i for j in range(len(part)) for i in range(G)]
            arrays = build_page_arrays(
                plan.groups[g0 : g0 + per],
                N,
                T // s.page_size,
                pow2_bucket(N * G),
                plan.table_width,
                s.num_pages,
                plan.num_slots,
                slots,
                private_only=True,
            )
            chunks.append((g0, tokens, true_lens, arrays))
        return chunks

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        group_size: int,
        max_new_tokens: int | Sequence[int],
        key: jax.Array,
        sampling: SamplingParams | None = None,
        timing: dict[str, float] | None = None,
        group_offset: int = 0,
    ) -> SampleOutput:
        """Sample ``group_size`` continuations of each prompt (token ids; see the module docstring).

        ``key``: a PRNG key for this call (sample i of prompt g uses fold_in(fold_in(key, group_offset + g),
        i), token t of it fold_in(that, t)). ``group_offset``: the first prompt's index in a larger batch
        split over calls or processes, so each prompt draws the same samples however the batch is split.
        ``sampling`` overrides ``sampler_cfg.sampling`` for this call. With a ``timing`` dict, prefill and
        decode are synchronised and timed ('prefill_s', 'decode_s' wall; 'prefill_cpu_s', 'decode_cpu_s' the
        process's CPU time, which a loaded machine inflates less; benchmarks).
        """
        if int(group_offset) != group_offset or not 0 <= group_offset < 2**31:
            raise SamplerError(f"group_offset must be an int in [0, 2**31), got {group_offset!r}")
        s = self.scfg
        sp = sampling or s.sampling
        plan, arrs = self.plan(prompts, group_size, max_new_tokens)
        self.last_plan = plan
        G = int(group_size)
        put = (lambda x: x) if self.mesh is None else partial(jax.device_put, device=replicated(self.mesh))
        try:
            chunks = self._chunk_arrays(plan, arrs, G)
            k_pages, v_pages = self._pages()
            self._pool = None  # donated below; rebuilt by _pages() if the call fails
            small = put(empty_state(None, None, plan.num_slots, plan.table_width)[2:])  # not the pool
            state = DecodeState(k_pages, v_pages, *small)
            out = put(
                Outputs(
                    jnp.full((plan.num_slots, plan.out_width), s.pad_id, jnp.int32),
                    jnp.zeros((plan.num_slots, plan.out_width), jnp.float32),
                    jnp.zeros((plan.num_slots, plan.out_width), jnp.float32),
                )
            )
            key = put(as_key(key))
            t0, c0 = time.perf_counter(), time.process_time()
            for first_group, tokens, true_lens, arrays in chunks:
                state, out = _prefill_insert(
                    self.params,
                    state,
                    out,
                    put(jnp.asarray(tokens)),
                    put(jnp.asarray(true_lens)),
                    key,
                    put(jnp.uint32(int(group_offset) + first_group)),
                    put(InsertArrays.from_host(arrays)),
                    cfg=self.cfg,
                    sp=sp,
                    group_size=G,
                    eos_ids=s.eos_ids,
                    kv_dtype=self.kv_dtype,
                    kv_shard=self.kv_shard,
                )
            if timing is not None:
                jax.block_until_ready((state, out))
                t1, c1 = time.perf_counter(), time.process_time()
                timing["prefill_s"], timing["prefill_cpu_s"] = t1 - t0, c1 - c0
            shared = put(SharedPrefix(*(jnp.asarray(x) for x in plan.shared_prefix())))
            state, out, steps = _decode_jit(
                self.params,
                self.cfg,
                state,
                out,
                sp,
                s.eos_ids,
                plan.chunk_pages,
                s.pad_id,
                self.kv_shard,
                self.dynamic_chunks,
                shared,
                plan.shared_chunk_pages,
                unroll_layers=self.unroll_layers,
                attention_kernel=self.attention_kernel,
            )
            self._pool = (state.k_pages, state.v_pages)
            host = jax.device_get((out, state.num_generated, state.finish, steps))
            if timing is not None:
                timing["decode_s"], timing["decode_cpu_s"] = time.perf_counter() - t1, time.process_time() - c1
        finally:
            for grp in plan.groups:
                grp.release(self.allocator)
        (o_tok, o_lp, o_plp), num_gen, finish, steps = host
        n = len(plan.groups) * int(group_size)
        M = max(g.budgets[0] for g in plan.groups)
        lengths = np.asarray(num_gen[:n], np.int32)
        return SampleOutput(
            tokens=np.asarray(o_tok[:n, :M]),
            logprobs=np.asarray(o_lp[:n, :M]),
            policy_logprobs=np.asarray(o_plp[:n, :M]),
            lengths=lengths,
            finish_reason=np.asarray(finish[:n], np.int8),
            prompt_lens=np.repeat(np.asarray([g.prompt_len for g in plan.groups], np.int32), group_size),
            group=np.repeat(np.arange(len(plan.groups), dtype=np.int32), group_size),
            prefilled_tokens=int(sum(g.prompt_len for g in plan.groups)),
            decoded_tokens=int(lengths.sum() - n),
            decode_steps=int(steps),
        )

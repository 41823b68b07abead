"""The group sampler the trainer calls: G continuations per prompt, each prompt prefilled once (Eq. 3).

``GroupSampler(params, cfg, sampler_cfg, mesh=None).generate(prompts, group_size, max_new_tokens, key)``
samples, for every prompt q_k || a_k^[0:-m] (question + cached answer prefix, as token ids), G continuations
o_i ~ pi_theta(. | q_k, a_k^[0:-m]) (paper Eq. 3) with a per-group budget of new tokens.

Data-parallel: the call's groups are spread over the D devices of the mesh's batch axes (data x fsdp),
balanced by tokens; each device prefills and decodes only its groups, from its own ``num_pages`` pages of
the KV pool, with the weights laid out for decoding (whole on every device of the batch axes, split over
``tensor``) in the compute dtype. ``scheduler.py`` is the host side, ``sharded.py`` the device programs.

Continuous batching: the pool is sized from a memory budget, not from the batch; a device holds R groups at
a time (R decode rows of G slots) and the rest wait. A call repeats
  1. admit: waiting groups that now fit (a free row and pages for prompt + budget) get pages and a row;
  2. prefill + insert (one jitted program per ``max_prefill_tokens`` padded prompt tokens per device): one
     forward per group prompt; its full pages are written once and shared by the group's G page tables, the
     partial last page is copied per sample; G first tokens come from that forward's last logits;
  3. decode segment (one jitted program): a ``lax.while_loop`` over steps for all slots, cascade attention
     (a group's shared prefix pages read once per step for its G samples), until every slot is done or
     enough rows could be refilled (``SamplerConfig.refill_fraction``; a device idle with work waiting also
     stops it); then the host reads one bool per slot, frees the pages of finished samples at once (a
     group's shared pages with its last sample) and goes back to 1.
With a pool that holds the whole call this is one prefill round and one decode segment. A sample's token t
is drawn with fold_in(fold_in(fold_in(key, group_offset + g), i), t) wherever and whenever it runs, so a
small pool, another device count or another batching give the same tokens as one big pool.

Shapes are bucketed (prompt length, groups per prefill call, rows, page-table widths, output width), so a
run compiles a bounded set of programs; params are a jit argument, so ``update_params`` never recompiles.
The KV pool is donated through every program and kept between calls; every page is back on its free list
when a call returns or fails.

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
  decode_steps       iterations of the decode loops (all segments), counted on device and read with the results
  decode_rows        rows the decode program steps at once (slots over all devices, finished ones included)
  decode_row_steps   rows computed over all steps: decode_rows per step, a quarter of them in the tail phase
                     (``tail_rows``: on CPU, once nothing waits and the live rows fit, see sharded.py)
  row_utilisation    decoded_tokens / decode_row_steps: the share of computed rows that made a token
  decode_segments    decode programs run (host round trips); refills = admission rounds after the first
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
from jax.sharding import PartitionSpec as P

from poer_jax.model.config import QwenConfig, dtype_from_name
from poer_jax.model.qwen import Params
from poer_jax.model.sharding import decode_param_shardings
from poer_jax.sampler.engine import InsertArrays, stack_layers, unroll_decode_layers, unstack_layers
from poer_jax.sampler.packed_weights import pack_weights, packed_shardings, unpack_weights, use_packed_matmuls
from poer_jax.sampler.paged_attention import attention_chunk_pages, attention_kernel, dynamic_attention_chunks
from poer_jax.sampler.pages import (
    PageAllocator,
    SamplerConfig,
    SamplerError,
    validate_budget,
    validate_prompt,
)
from poer_jax.sampler.sampling import SamplingParams, as_key
from poer_jax.sampler.scheduler import CallShapes, GroupWork, Scheduler, call_shapes, plan_groups, rows_that_fit
from poer_jax.sampler.sharded import (
    PrefillBatch,
    SampleBuffers,
    SegmentControl,
    SlotState,
    batch_shards,
    decode_segment,
    decode_tail_rows,
    decode_weights,
    empty_buffers,
    empty_slots,
    layer_shardings,
    pool_shapes,
    pool_shardings,
    prefill_insert,
    rows_sharding,
)


def per_layer_program(cfg: QwenConfig, shardings: Params, unrolled: bool, packed: bool) -> Any:
    """The jitted program ``update_params`` runs on the placed weights: None (stacked weights: the scan), the
    per-layer slices (``unstack_layers``), or those slices with their products packed (``pack_weights``)."""
    if not unrolled:
        return None
    per_layer = layer_shardings(shardings, cfg)
    if not packed:
        return jax.jit(partial(unstack_layers, cfg=cfg), out_shardings=per_layer)
    return jax.jit(lambda p: pack_weights(unstack_layers(p, cfg), cfg), out_shardings=packed_shardings(per_layer))


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
    decode_segments: int = 1
    refills: int = 0
    decode_rows: int = 0
    decode_row_steps: int = 0

    @property
    def generated_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def row_utilisation(self) -> float:
        """decoded_tokens / decode_row_steps; 1.0 when nothing was decoded (no step ran)."""
        return row_utilisation(self.decoded_tokens, self.decode_row_steps)


def row_utilisation(decoded_tokens: int, row_steps: int) -> float:
    """Tokens made by decode steps over the rows those steps computed (``decode_steps`` x rows per step, summed
    over calls): 1.0 when every row of every step made a token, low when a few long samples hold the batch."""
    return float(decoded_tokens) / row_steps if row_steps > 0 else 1.0


@dataclasses.dataclass
class CallPlan:
    """Host-side plan of one call (kept as ``last_plan``): its groups (device, pages) and shapes."""

    groups: list[GroupWork]
    shapes: CallShapes

    @property
    def groups_per_prefill(self) -> int:
        """The most groups a device prefills per call."""
        return self.shapes.prefill_rows


class GroupSampler:
    """Paged-KV group sampler; see the module docstring. Not thread-safe (host-side allocators)."""

    def __init__(self, params: Params, cfg: QwenConfig, sampler_cfg: SamplerConfig, mesh: Mesh | None = None):
        self.cfg, self.scfg, self.mesh = cfg, sampler_cfg, mesh
        self.shards = batch_shards(mesh)
        self.kv_dtype = dtype_from_name(sampler_cfg.kv_dtype or cfg.dtype)
        self.dynamic_chunks = dynamic_attention_chunks(sampler_cfg, mesh)
        self.chunk_pages = attention_chunk_pages(sampler_cfg, mesh)
        self.attention_kernel = attention_kernel(sampler_cfg, mesh)
        self.unroll_layers = unroll_decode_layers(sampler_cfg, mesh)
        self.packed_matmuls = use_packed_matmuls(sampler_cfg, cfg, mesh, self.unroll_layers)
        self.allocators = [PageAllocator(sampler_cfg.num_pages) for _ in range(self.shards)]
        # without a mesh everything lives on one device: the (lowest) device of the weights given here
        self._device = min(jax.tree.leaves(params)[0].devices(), key=lambda d: d.id)
        if mesh is None:
            one = SingleDeviceSharding(self._device)
            self.param_shardings = jax.tree.map(lambda _: one, params)
        else:
            self.param_shardings = decode_param_shardings(cfg, mesh)
        self._reshard = jax.jit(partial(decode_weights, cfg=cfg), out_shardings=self.param_shardings)
        self._unstack = per_layer_program(cfg, self.param_shardings, self.unroll_layers, self.packed_matmuls)
        self._weights: Params | None = None
        self.update_params(params)
        self._pool: tuple[jax.Array, jax.Array] | None = None
        self._pool_programs: tuple[Any, ...] | None = None  # the jitted zeros that rebuild the pool after release()
        self.last_plan: CallPlan | None = None

    # ---- weights and pool --------------------------------------------------------------------------
    def _placed(self, params: Params) -> bool:
        dt = self.cfg.jnp_dtype
        leaves = jax.tree.leaves(params)
        if not all(isinstance(x, jax.Array) and (x.dtype == dt or not jnp.issubdtype(x.dtype, jnp.floating))
                   for x in leaves):
            return False
        targets = jax.tree.leaves(self.param_shardings)
        # exact sharding types and committed arrays: input shardings key the compiled programs, and a one-device
        # mesh (``load_hf``) or an uncommitted array (``init_params``) is equivalent to, but not the same key as,
        # an array committed to a single device
        return len(targets) == len(leaves) and all(
            x.committed and type(x.sharding) is type(t) and x.sharding.is_equivalent_to(t, x.ndim)
            for x, t in zip(leaves, targets, strict=True))

    def _place(self, params: Params) -> Params:
        """The decode layout (``decode_param_shardings``; one device without a mesh) in the compute dtype
        (``decode_weights``), whatever produced ``params`` (``load_hf``'s one-device mesh, ``init_params``'s
        default device, the trainer's FSDP layout): one jitted reshard and cast on device (nothing when
        ``params`` are laid out so already). One canonical placement, so a call after ``update_params`` reuses
        the programs of the first call. Weights on other devices than the sampler's are first moved there."""
        if self._placed(params):
            return params
        targets = jax.tree.leaves(self.param_shardings)
        leaves = jax.tree.leaves(params)
        if any(not isinstance(x, jax.Array) or x.sharding.device_set != t.device_set
               for x, t in zip(leaves, targets, strict=True)):
            params = jax.device_put(params, self.param_shardings)  # device to device, then cast below
        return self._reshard(params)

    def update_params(self, params: Params) -> None:
        """Swap in new weights (same shapes: the compiled programs are reused).

        With the layers unrolled (``SamplerConfig.layer_loop``; CPU by default) the sampler holds each layer's
        weights as arrays of their own, sliced here once per update, so its own copy of the weights even where
        the caller's are already laid out for decoding. Sliced inside the programs instead, XLA:CPU would copy
        every weight at every call (~10 ms per decode step of a 128-token call on the h896 shape). With the packed
        CPU kernel (``SamplerConfig.matmul_kernel``) the slices' products are packed here too."""
        placed = self._place(params)
        self._weights = placed if self._unstack is None else self._unstack(placed)

    @property
    def params(self) -> Params | None:
        """The sampler's weights in the model's stacked layout (None after ``release``). Per-layer weights (layers
        unrolled) are stacked anew on every access: a copy, for export and inspection, not for a hot loop."""
        w = self._weights
        return w if w is None or not isinstance(w["layers"], tuple) else stack_layers(unpack_weights(w, self.cfg))

    def release(self) -> None:
        """Drop the sampler's weights and KV pool until the next ``update_params``, so their memory is free
        while the trainer updates (the pool is rebuilt, in place, by the next call). Weights shared with the
        caller stay alive through the caller's references."""
        self._weights = None
        self._pool = None

    @property
    def pool_shape(self) -> tuple[int, ...]:
        """Global K (or V) pool [L, Hkv, D * num_pages, page, hd] (the fused K/V pool [L, D * num_pages, page,
        2 Hkv, hd] with the pallas_tpu kernel); each device of the batch axes holds num_pages of its pages."""
        return pool_shapes(self.cfg, self.scfg, self.shards, self.attention_kernel)[0]

    def _pages(self) -> tuple[jax.Array, jax.Array]:
        if self._pool is None or any(p.is_deleted() for p in self._pool):
            if self.mesh is None:
                one = SingleDeviceSharding(self._device)
                places = (one, one)
            else:
                places = pool_shardings(self.cfg, self.mesh, self.attention_kernel)
            shapes = pool_shapes(self.cfg, self.scfg, self.shards, self.attention_kernel)
            if self._pool_programs is None:  # one program each, kept: a new jax.jit per rebuild (every training
                # step, after release()) traced and compiled anew each time, ~0.25 s a step on the demo's CPU
                self._pool_programs = tuple(jax.jit(partial(jnp.zeros, shape, self.kv_dtype), out_shardings=place)
                                            for shape, place in zip(shapes, places, strict=True))
            self._pool = tuple(make() for make in self._pool_programs)  # type: ignore[assignment]  # in place
        return self._pool  # type: ignore[return-value]

    @property
    def num_free_pages(self) -> int:
        """Free pages over all devices (every page is free between calls)."""
        return sum(a.num_free for a in self.allocators)

    # ---- host planning ------------------------------------------------------------------------------
    def plan(
        self, prompts: Sequence[Sequence[int]], group_size: int, max_new_tokens: int | Sequence[int]
    ) -> CallPlan:
        """Validate, spread the groups over the devices, choose bucketed shapes (nothing is allocated)."""
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
        budgets = [validate_budget(n, b, s, f"prompt {g}") for g, (n, b) in enumerate(zip(lens, budgets, strict=True))]
        groups = plan_groups(arrs, budgets, int(group_size), s.page_size, self.shards, s.num_pages)
        per_device = max(sum(1 for grp in groups if grp.shard == d) for d in range(self.shards))
        shapes = call_shapes(lens, budgets, int(group_size), s, self.chunk_pages, per_device,
                             rows_that_fit(groups, self.shards, s.num_pages),
                             fixed_widths=s.fixed_tables and self.dynamic_chunks)
        return CallPlan(groups, shapes)

    # ---- device transfers ---------------------------------------------------------------------------
    def _put(self, tree: Any) -> Any:
        """Host arrays whose leading axis is D x local rows -> device arrays split over the batch axes
        (scalars replicated)."""
        if self.mesh is None:
            one = SingleDeviceSharding(self._device)
            return jax.tree.map(lambda x: jax.device_put(x, one), tree)
        mesh = self.mesh
        return jax.tree.map(
            lambda x: jax.device_put(x, rows_sharding(mesh, x.ndim) if np.ndim(x) else NamedSharding(mesh, P())),
            tree,
        )

    def _fresh_state(self, sh: CallShapes) -> tuple[SlotState, SampleBuffers]:
        k_pages, v_pages = self._pages()
        self._pool = None  # donated below; rebuilt by _pages() if the call fails
        D = self.shards
        small = self._put(empty_slots(sh.slots, sh.rows, sh.table_width, sh.shared_width, D))  # None: no leaf
        state = small._replace(decode=small.decode._replace(k_pages=k_pages, v_pages=v_pages))
        out = self._put(empty_buffers(D * sh.out_groups * sh.group_size, sh.out_width, self.scfg.pad_id))
        return state, out

    # ---- the call -----------------------------------------------------------------------------------
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
        if self._weights is None:
            raise SamplerError("sampler: weights were released (release()); call update_params first")
        s = self.scfg
        sp = sampling or s.sampling
        plan = self.plan(prompts, group_size, max_new_tokens)
        self.last_plan = plan
        sh, G = plan.shapes, int(group_size)
        sched = Scheduler(plan.groups, self.allocators, sh, s.page_size, s.pad_id, int(group_offset),
                          s.refill_fraction)
        if timing is not None:
            for name in ("prefill_s", "decode_s", "prefill_cpu_s", "decode_cpu_s"):
                timing[name] = 0.0
        steps = segments = tail_steps = 0
        tail_rows = self.tail_rows(sh.rows)
        try:
            key = self._put(as_key(key))
            state, out = self._fresh_state(sh)
            while True:
                admitted = sched.admit()
                if not any(admitted) and not any(sched.running):
                    raise SamplerError("sampler: no group can be admitted and none is running")  # a bug guard
                t0, c0 = time.perf_counter(), time.process_time()
                for batch in sched.prefill_batches(admitted, s.num_pages) if any(admitted) else []:
                    state, out = prefill_insert(
                        self._weights, state, out, self._prefill_batch(batch), key, cfg=self.cfg, sp=sp,
                        group_size=G, eos_ids=s.eos_ids, kv_dtype=self.kv_dtype, mesh=self.mesh)
                if timing is not None:
                    jax.block_until_ready((state, out))
                    timing["prefill_s"] += time.perf_counter() - t0
                    timing["prefill_cpu_s"] += time.process_time() - c0
                t1, c1 = time.perf_counter(), time.process_time()
                last = sched.pending == 0  # nothing waits: this segment runs every slot to its end
                state, out, seg_steps = decode_segment(
                    self._weights, state, out, SegmentControl(**self._put(sched.control())), cfg=self.cfg, sp=sp,
                    eos_ids=s.eos_ids, chunk_pages=sh.chunk_pages, pad_id=s.pad_id,
                    dynamic_chunks=self.dynamic_chunks, shared_chunk_pages=sh.shared_chunk_pages, mesh=self.mesh,
                    attention_kernel=self.attention_kernel, tail_rows=tail_rows)
                segments += 1
                if last:
                    host, seg_steps = jax.device_get((out, seg_steps))
                else:
                    active, seg_steps = jax.device_get((state.decode.active, seg_steps))
                    sched.release(np.asarray(active))
                if timing is not None:
                    timing["decode_s"] += time.perf_counter() - t1
                    timing["decode_cpu_s"] += time.process_time() - c1
                seg_steps = np.asarray(seg_steps)[0]  # (steps, of which on the tail's rows), the same on every device
                steps, tail_steps = steps + int(seg_steps[0]), tail_steps + int(seg_steps[1])
                if last:
                    break
            self._pool = (state.decode.k_pages, state.decode.v_pages)
        finally:
            sched.release_all()
        row_steps = self.shards * G * ((steps - tail_steps) * sh.rows + tail_steps * tail_rows)
        return self._outputs(plan, host, steps, segments, sched.admissions - 1, row_steps)

    def _prefill_batch(self, batch: dict[str, np.ndarray]) -> PrefillBatch:
        arrays = self._put(batch)
        ins = InsertArrays(**{f: arrays[f"insert.{f}"] for f in InsertArrays._fields})
        return PrefillBatch(**{f: arrays[f] for f in PrefillBatch._fields if f != "insert"}, insert=ins)

    def tail_rows(self, rows: int) -> int:
        """Rows of the decode tail of a call of ``rows`` decode rows (``sharded.decode_tail_rows``)."""
        device = self.mesh.devices.flat[0] if self.mesh is not None else self._device
        return decode_tail_rows(self.scfg.tail_rows, device.platform, rows)

    def _outputs(self, plan: CallPlan, host: SampleBuffers, steps: int, segments: int, refills: int,
                 row_steps: int) -> SampleOutput:
        sh, G = plan.shapes, plan.shapes.group_size
        per_device = sh.out_groups * G
        rows = np.asarray([grp.shard * per_device + grp.out_group * G + i for grp in plan.groups for i in range(G)])
        M = max(grp.budget for grp in plan.groups)
        lengths = np.asarray(host.lengths, np.int32)[rows]
        n = len(rows)
        return SampleOutput(
            tokens=np.asarray(host.tokens)[rows, :M],
            logprobs=np.asarray(host.logprobs)[rows, :M],
            policy_logprobs=np.asarray(host.policy_logprobs)[rows, :M],
            lengths=lengths,
            finish_reason=np.asarray(host.finish, np.int8)[rows],
            prompt_lens=np.repeat(np.asarray([grp.prompt.size for grp in plan.groups], np.int32), G),
            group=np.repeat(np.arange(len(plan.groups), dtype=np.int32), G),
            prefilled_tokens=int(sum(grp.prompt.size for grp in plan.groups)),
            decoded_tokens=int(lengths.sum() - n),
            decode_steps=steps,
            decode_segments=segments,
            refills=refills,
            decode_rows=self.shards * sh.slots,
            decode_row_steps=row_steps,
        )

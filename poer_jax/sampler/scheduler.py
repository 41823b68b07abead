"""Host side of continuous batching: which device runs which group, when it is admitted, and its pages.

A call's groups are spread over the D devices of the batch axes, balanced by tokens (longest-processing-time
first: a group costs its prompt plus G x its budget, the next largest goes to the least loaded device).
Each device has its own page allocator over its part of the pool (local page ids), R decode rows of G slots
and a FIFO queue of its groups. A group is admitted when a row is free and its pages (``pages.py``: shared
full prompt pages + each sample's private pages for prompt + budget) fit; a sample's private pages go back
to the free list as soon as it finishes, its group's shared pages when the last sample finishes, and the
row takes the next waiting group. A group that alone exceeds a device's pool is refused before anything
is allocated.

The host visits after each decode segment (see ``sharded.py`` for when a segment stops): it reads one
bool per slot (still active?), releases what finished, admits what now fits and prefills it.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Sequence

import numpy as np

from poer_jax.sampler.pages import (
    GroupPages,
    PageAllocator,
    PoolExhaustedError,
    SamplerConfig,
    SamplerError,
    allocate_groups,
    build_page_arrays,
    cached_positions,
    cdiv,
    group_page_counts,
    pow2_bucket,
    prefill_bucket,
    round_up,
    shape_bucket,
)

NO_REFILL = 2**30  # a segment target no device can reach: run until every slot is done


def assign_shards(costs: Sequence[int], shards: int) -> list[int]:
    """Device of each group: largest cost first, to the least loaded device (lowest id on ties)."""
    load = [0] * shards
    out = [0] * len(costs)
    for g in sorted(range(len(costs)), key=lambda g: (-costs[g], g)):
        s = min(range(shards), key=lambda d: (load[d], d))
        out[g] = s
        load[s] += costs[g]
    return out


@dataclasses.dataclass
class GroupWork:
    """One group of a call: its prompt, budget, device, output rows and (once admitted) pages and row."""

    index: int
    prompt: np.ndarray
    budget: int
    num_pages: int  # shared + private pages of all samples
    shard: int = 0
    out_group: int = 0  # output rows out_group * G + i on its device
    pages: GroupPages | None = None
    row: int = -1
    released: list[bool] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CallShapes:
    """Bucketed shapes of one call (static for its programs). Per device: ``rows`` decode rows of
    ``group_size`` slots, ``out_groups`` x G output rows of ``out_width`` tokens; page tables of
    ``table_width`` private / ``shared_width`` shared pages read in chunks of ``chunk_pages`` /
    ``shared_chunk_pages``; prefill calls of up to ``prefill_rows`` prompts (a power of two: as many as a
    round admits) x ``prefill_len`` tokens."""

    group_size: int
    rows: int
    out_groups: int
    out_width: int
    table_width: int
    chunk_pages: int
    shared_width: int
    shared_chunk_pages: int
    prefill_len: int
    prefill_rows: int

    @property
    def slots(self) -> int:
        return self.rows * self.group_size


def call_shapes(
    prompt_lens: Sequence[int],
    budgets: Sequence[int],
    group_size: int,
    scfg: SamplerConfig,
    chunk_pages: int,
    groups_per_device: int,
    rows_fit: int,
    fixed_widths: bool,
) -> CallShapes:
    """Shapes of a call. ``groups_per_device``: the most groups one device gets; ``rows_fit``: the most it
    can hold at once (pool); rows are also capped by ``max_slots`` per device.

    Page-table widths are bucketed to the call's longest prompt / budget, or with ``fixed_widths``
    (``SamplerConfig.fixed_tables``, data-dependent attention loops only) as wide as the config allows, so
    the decode program has one shape per row count. The output width follows the private table:
    table_width x page_size + 1 >= any budget it holds."""
    page = scfg.page_size
    if fixed_widths:
        shared, private = max(1, scfg.max_prefill_length // page), scfg.max_pages_per_seq
    else:
        shared = shape_bucket(max(n // page for n in prompt_lens))  # >= 1: an empty prefix is masked by length
        private = shape_bucket(
            max(cdiv(cached_positions(n, b), page) - n // page for n, b in zip(prompt_lens, budgets, strict=True)))
    chunk, shared_chunk = min(chunk_pages, private), min(chunk_pages, shared)
    T = prefill_bucket(max(prompt_lens), page)
    rows = min(shape_bucket(max(1, min(groups_per_device, rows_fit))), max(1, scfg.max_slots // group_size))
    table_width = round_up(private, chunk)
    return CallShapes(
        group_size=int(group_size),
        rows=rows,
        out_groups=shape_bucket(groups_per_device),
        out_width=table_width * page + 1,
        table_width=table_width,
        chunk_pages=chunk,
        shared_width=round_up(shared, shared_chunk),
        shared_chunk_pages=shared_chunk,
        prefill_len=T,
        prefill_rows=min(pow2_bucket(rows), prefill_rows_cap(scfg, T)),
    )


def prefill_rows_cap(scfg: SamplerConfig, prefill_len: int) -> int:
    """Prompts per device and prefill call: the largest power of two within ``max_prefill_tokens``."""
    return 1 << max(scfg.max_prefill_tokens // prefill_len, 1).bit_length() - 1


class Scheduler:
    """The admission / release bookkeeping of one call over ``len(allocators)`` devices (module docstring).

    ``allocators`` are the sampler's (one per device, all pages free); every page taken here is returned by
    ``release`` / ``release_all``."""

    def __init__(
        self,
        groups: list[GroupWork],
        allocators: Sequence[PageAllocator],
        shapes: CallShapes,
        page_size: int,
        pad_id: int,
        group_offset: int,
        refill_fraction: float,
    ) -> None:
        self.groups, self.allocators, self.shapes = groups, list(allocators), shapes
        self.page_size, self.pad_id, self.group_offset = page_size, pad_id, group_offset
        self.refill_fraction = refill_fraction
        D = len(self.allocators)
        self.waiting: list[deque[GroupWork]] = [deque() for _ in range(D)]
        for grp in groups:  # FIFO per device in group order
            self.waiting[grp.shard].append(grp)
        self.free_rows: list[list[int]] = [list(range(shapes.rows - 1, -1, -1)) for _ in range(D)]
        self.running: list[dict[int, GroupWork]] = [{} for _ in range(D)]
        self.admissions = 0

    @property
    def shards(self) -> int:
        return len(self.allocators)

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self.waiting)

    @property
    def done(self) -> bool:
        return self.pending == 0 and not any(self.running)

    # ---- admission -----------------------------------------------------------------------------------
    def admit(self) -> list[list[GroupWork]]:
        """Per device, the waiting groups (FIFO) that now get a row and their pages."""
        G = self.shapes.group_size
        admitted: list[list[GroupWork]] = [[] for _ in range(self.shards)]
        for s, queue in enumerate(self.waiting):
            alloc = self.allocators[s]
            while queue and self.free_rows[s] and queue[0].num_pages <= alloc.num_free:
                grp = queue.popleft()
                (grp.pages,) = allocate_groups(alloc, [grp.prompt.size], [[grp.budget] * G], self.page_size)
                grp.row = self.free_rows[s].pop()
                grp.released = [False] * G
                self.running[s][grp.row] = grp
                admitted[s].append(grp)
        if any(admitted):
            self.admissions += 1
        return admitted

    def prefill_batches(self, admitted: list[list[GroupWork]], num_pages: int) -> list[dict[str, np.ndarray]]:
        """Host arrays of ``sharded.PrefillBatch`` for the admitted groups: one dict per prefill call, each
        array [D * local size, ...] (device s's rows at [s * n, (s + 1) * n)); at most ``prefill_rows``
        groups per device and call."""
        most = max(len(a) for a in admitted)
        N = min(pow2_bucket(most), self.shapes.prefill_rows)  # a refill of a few groups prefills a few rows
        batches = []
        for c in range(math.ceil(most / N)):
            parts = [self._local_batch(a[c * N : (c + 1) * N], N, num_pages) for a in admitted]
            batches.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        return batches

    def _local_batch(self, groups: list[GroupWork], N: int, num_pages: int) -> dict[str, np.ndarray]:
        sh, G, page = self.shapes, self.shapes.group_size, self.page_size
        T = sh.prefill_len
        tokens = np.full((N, T), self.pad_id, np.int32)
        true_lengths = np.zeros((N,), np.int32)
        group_ids = np.zeros((N,), np.uint32)
        rows = np.full((N,), sh.rows, np.int32)
        shared_table = np.zeros((N, sh.shared_width), np.int32)
        shared_lengths = np.zeros((N,), np.int32)
        out_row = np.full((N * G,), sh.out_groups * G, np.int32)
        for j, grp in enumerate(groups):
            assert grp.pages is not None
            tokens[j, : grp.prompt.size] = grp.prompt
            true_lengths[j] = grp.prompt.size
            group_ids[j] = self.group_offset + grp.index
            rows[j] = grp.row
            shared_table[j, : len(grp.pages.shared)] = grp.pages.shared
            shared_lengths[j] = len(grp.pages.shared) * page
            out_row[j * G : (j + 1) * G] = grp.out_group * G + np.arange(G)
        slots = [grp.row * G + i for grp in groups for i in range(G)]
        arrays = build_page_arrays(
            [grp.pages for grp in groups if grp.pages is not None],
            N,
            T // page,
            N * G,
            sh.table_width,
            num_pages,
            sh.slots,
            slots,
            private_only=True,
        )
        ins = {f"insert.{f.name}": getattr(arrays, f.name) for f in dataclasses.fields(arrays)}
        return dict(
            tokens=tokens, true_lengths=true_lengths, group_ids=group_ids, rows=rows, shared_table=shared_table,
            shared_lengths=shared_lengths, out_row=out_row, **ins,
        )

    # ---- a decode segment's stopping rule ------------------------------------------------------------
    def control(self) -> dict[str, np.ndarray]:
        """Host arrays of ``sharded.SegmentControl`` ([D] / [D * S] / [D * R] and the global target)."""
        sh, G, D = self.shapes, self.shapes.group_size, self.shards
        pending = np.asarray([len(q) for q in self.waiting], np.int32)
        free = np.asarray([a.num_free for a in self.allocators], np.int32)
        need = np.asarray([q[0].num_pages if q else 0 for q in self.waiting], np.int32)
        slot_pages = np.zeros((D, sh.slots), np.int32)
        row_pages = np.zeros((D, sh.rows), np.int32)
        for s, running in enumerate(self.running):
            for r, grp in running.items():
                assert grp.pages is not None
                row_pages[s, r] = len(grp.pages.shared)
                for i in range(G):
                    if not grp.released[i]:
                        slot_pages[s, r * G + i] = len(grp.pages.private[i])
        total = int(pending.sum())
        target = NO_REFILL if total == 0 else max(1, min(total, math.ceil(D * sh.rows * self.refill_fraction)))
        return dict(
            pending=pending, free_pages=free, next_need=need, slot_pages=slot_pages.reshape(-1),
            row_pages=row_pages.reshape(-1), target=np.asarray(target, np.int32),
        )

    # ---- release -------------------------------------------------------------------------------------
    def release(self, active: np.ndarray) -> None:
        """Return the pages of every sample that is no longer ``active`` ([D * S] bool, slot order); free the
        rows whose samples have all finished."""
        G, S = self.shapes.group_size, self.shapes.slots
        for s, running in enumerate(self.running):
            for r in list(running):
                grp = running[r]
                assert grp.pages is not None
                for i in range(G):
                    if not grp.released[i] and not active[s * S + r * G + i]:
                        self.allocators[s].release(grp.pages.table(i))
                        grp.released[i] = True
                if all(grp.released):
                    del running[r]
                    self.free_rows[s].append(r)
        for rows in self.free_rows:
            rows.sort(reverse=True)  # lowest row first, whatever the finishing order

    def release_all(self) -> None:
        """Return every page still held (the end of a call, or a failure part-way)."""
        for s, running in enumerate(self.running):
            for grp in running.values():
                assert grp.pages is not None
                for i, done in enumerate(grp.released):
                    if not done:
                        self.allocators[s].release(grp.pages.table(i))
                        grp.released[i] = True
            running.clear()


def plan_groups(
    prompts: Sequence[np.ndarray], budgets: Sequence[int], group_size: int, page_size: int, shards: int,
    pool_pages: int,
) -> list[GroupWork]:
    """The call's groups with their page needs and devices; refuses a group larger than a device's pool."""
    groups = []
    for g, (p, b) in enumerate(zip(prompts, budgets, strict=True)):
        shared, private = group_page_counts(p.size, [b] * group_size, page_size)
        need = shared + sum(private)
        if need > pool_pages:
            raise PoolExhaustedError(
                f"page pool exhausted: group {g} (prompt {p.size} + budget {b} tokens, G {group_size}) needs "
                f"{need} pages, a device's pool has {pool_pages}; raise the KV budget (rollout.kv_cache_gb / "
                "rollout.num_pages, SamplerConfig.num_pages) or send shorter requests")
        groups.append(GroupWork(g, p, int(b), need))
    costs = [grp.prompt.size + group_size * grp.budget for grp in groups]
    counts = [0] * shards
    for grp, s in zip(groups, assign_shards(costs, shards), strict=True):
        grp.shard, grp.out_group = s, counts[s]
        counts[s] += 1
    if not groups:
        raise SamplerError("generate: no prompts")
    return groups


def rows_that_fit(groups: Sequence[GroupWork], shards: int, pool_pages: int) -> int:
    """The most groups one device can hold at once, admitting its groups in order into an empty pool."""
    best = 0
    for s in range(shards):
        used = n = 0
        for grp in groups:
            if grp.shard != s:
                continue
            if used + grp.num_pages > pool_pages:
                break
            used += grp.num_pages
            n += 1
        best = max(best, n)
    return best

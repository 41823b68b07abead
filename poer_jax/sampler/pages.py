"""Host-side request planning for the paged KV cache: limits, page allocator, page tables (copy on write).

The device holds one page pool per layer (``k_pages/v_pages [L, Hkv, num_pages, page_size, hd]``, see
paged_attention.py); a sequence's token at position t lives in page ``table[t // page_size]`` at offset
``t % page_size``. Allocation is a plain free list with reference counts on the host (JetStream's experimental
engine did the same): it runs once per request at insert time, never inside the decode loop.

Layout of one group (prompt of length P, samples i = 0..G-1 with budgets n_i new tokens):
  shared   = P // page_size full prompt pages, written once by the group's single prefill and referenced by
             every sample's table (reference count G);
  private_i = ceil((P + n_i - 1) / page_size) - len(shared) pages owned by sample i. When P is not a
             multiple of page_size, private_i[0] receives a copy of the prompt's partial last page (copy on
             write: the sample's own tokens are then appended to its own copy). The last sampled token's KV
             is never computed, hence P + n_i - 1 cached positions.
  table_i  = shared + private_i (the engine's per-slot tables; the batch sampler keeps ``shared`` in a
             group-level table for cascade attention and gives each slot only private_i).

Every request is checked against the free list before anything is taken, so a request that does not fit
raises ``PoolExhaustedError`` and leaves the pool exactly as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from poer_jax.model.config import QwenConfig, dtype_from_name
from poer_jax.sampler.sampling import SamplingParams

ATTENTION_KERNELS = ("auto", "xla", "pallas_gpu", "pallas_tpu")
LAYER_LOOPS = ("auto", "scan", "unrolled")
KV_LAYOUTS = ("auto", "split", "fused")
MATMUL_KERNELS = ("auto", "xla", "packed_cpu")
TAIL_ROWS = ("auto", "on", "off")


class SamplerError(ValueError):
    """A request the sampler cannot serve; the message names the group / slot / limit."""


class PoolExhaustedError(SamplerError):
    """The page pool (or the slot set) cannot hold a request; nothing was allocated."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(n: int, multiple: int) -> int:
    return cdiv(n, multiple) * multiple


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


def shape_bucket(n: int, minimum: int = 1) -> int:
    """Smallest 2^k or 3 * 2^(k-1) >= max(n, minimum): two sizes per octave, so a run compiles a bounded set
    of programs and padding wastes at most a third (pow2 alone wastes up to half)."""
    p = pow2_bucket(n, minimum)
    return 3 * p // 4 if p >= 4 and 3 * p // 4 >= max(int(n), int(minimum)) else p


def even_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the fewest batches of at most ``batch_size`` of n items, their sizes as equal as can
    be (they differ by at most one): 160 prompts in batches of 64 -> 53, 53, 54 rather than 64, 64, 32. The
    sampler's shapes are buckets of the batch's size (``shape_bucket``), so equal batches share one
    compiled program where a short last batch would compile its own."""
    if batch_size < 1:
        raise ValueError(f"pages.py: batch_size must be >= 1, got {batch_size}")
    count = -(-n // batch_size)
    bounds = [i * n // count for i in range(count + 1)] if count else [0]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def cached_positions(prompt_len: int, budget: int) -> int:
    """KV positions a sample needs: the prompt plus every generated token but the last."""
    return prompt_len + budget - 1


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static sampler settings (hashable; part of the compiled programs' keys).

    page_size: tokens per KV page. num_pages: pages in the pool (per layer); for the group sampler, pages *per
    device* of the batch axes (each holds its own part of the pool, see batch_sampler.py); for the engine,
    the whole pool. max_slots: decode slots (the engine's max_concurrent_decodes; the group sampler's decode
    slots per device, rounded down to whole groups, at least one group). max_pages_per_seq: page-table width
    of the engine and the cap prompt + budget - 1 <= max_pages_per_seq * page_size. max_prefill_length:
    longest prompt. max_prefill_tokens: padded prompt tokens per prefill call and device of the batch sampler
    (bounds prefill activation memory; more groups are prefilled in several calls). refill_fraction: the
    group sampler's decode loop returns to the host to admit waiting groups once that fraction of all decode
    rows could take one (or a device with waiting groups has gone idle); larger values mean fewer, larger
    refills (continuous batching, batch_sampler.py). fixed_tables: the group sampler's page tables as wide
    as this config allows, so its decode program has one shape per decode row count instead of one per
    bucket of the call's longest prompt and budget (fewer compiles; with data-dependent attention loops
    only, where pages past the longest sequence are never read; a short continuation then reads a whole
    attention chunk, measured ~10 % slower decode on CPU for POER-like calls). attn_chunk_pages: pages read per
    attention chunk (the decode attention loop's granularity; default by platform, see
    ``paged_attention.attention_chunk_pages``). attn_dynamic_chunks: stop the chunk loop at the longest
    sequence (default: yes, except on GPU where a fixed trip count avoids host round trips).
    eos_ids: tokens that end a sample (kept as its last token). pad_id: fills outputs after a sample's end.
    kv_dtype: KV pool dtype (default: the model's compute dtype).
    attention_kernel: decode attention over the pages, one of ATTENTION_KERNELS: 'xla' (pure JAX, any
    backend; the reference), 'pallas_gpu' (JAX's Triton paged-attention kernel), 'pallas_tpu' (JAX's Mosaic
    ragged paged-attention kernel), 'auto' (by the platform: pallas_gpu on NVIDIA GPUs, pallas_tpu on TPUs,
    xla elsewhere); see ``paged_attention.attention_kernel``.
    layer_loop: how the sampler's programs run the layers: 'scan' (one ``lax.scan`` over the stacked weights),
    'unrolled' (the programs unrolled over layers, on per-layer weights the sampler slices once per weight update
    and holds: its own copy of the weights; in a scan XLA:CPU copies each layer's weights before its matmuls at
    every decode step), 'auto' (unrolled on CPU).
    kv_layout: the KV pool's layout, one of KV_LAYOUTS: 'split' (K and V pools [L, Hkv, N, page, hd]), 'fused'
    (one K/V pool: [L, N, Hkv, 2, page, hd] for the xla kernel, written a page at a time; pallas_tpu's own
    [L, N, page, 2 Hkv, hd]), 'auto' (fused on TPUs, with pallas_tpu and on GPUs with the KV heads split over
    'tensor'; split elsewhere; see ``paged_attention.attention_kernel``).
    matmul_kernel: the weight products, one of MATMUL_KERNELS: 'xla' (XLA's dot), 'packed_cpu' (the weights packed
    once per update in 32-column panels, multiplied by a C++ FFI kernel built on first use; CPU, float32 or
    bfloat16, layers unrolled, no tensor axis: ``packed_weights.py``), 'auto' (packed_cpu where it applies and
    builds, else xla).
    tail_rows: the group sampler's decode tail, one of TAIL_ROWS: 'on' (once nothing waits and the live rows fit
    in a quarter of the decode rows, they move into a decode state of that quarter and decode to the end, in the
    same program: ``sharded.decode_segment``), 'off', 'auto' (on on CPU, where a decode step costs about its rows;
    off on accelerators, where it costs about the same for few rows or many).
    """

    page_size: int = 16
    num_pages: int = 1024
    max_slots: int = 64
    max_pages_per_seq: int = 256
    max_prefill_length: int = 4096
    max_prefill_tokens: int = 16384
    attn_chunk_pages: int | None = None
    attn_dynamic_chunks: bool | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    sampling: SamplingParams = SamplingParams()
    kv_dtype: str | None = None
    refill_fraction: float = 0.25
    fixed_tables: bool = False
    attention_kernel: str = "auto"
    layer_loop: str = "auto"
    kv_layout: str = "auto"
    matmul_kernel: str = "auto"
    tail_rows: str = "auto"

    def __post_init__(self) -> None:
        for name in (
            "page_size",
            "num_pages",
            "max_slots",
            "max_pages_per_seq",
            "max_prefill_length",
            "max_prefill_tokens",
            "attn_chunk_pages",
        ):
            v = getattr(self, name)
            if v is None and name == "attn_chunk_pages":
                continue
            if int(v) != v or v <= 0:
                raise SamplerError(f"SamplerConfig.{name} must be a positive int, got {v!r}")
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))
        if not isinstance(self.sampling, SamplingParams):
            raise SamplerError(
                f"SamplerConfig.sampling must be SamplingParams, got {type(self.sampling).__name__}"
            )
        if self.kv_dtype is not None:
            dtype_from_name(self.kv_dtype)
        if not 0.0 < self.refill_fraction <= 1.0:
            raise SamplerError(f"SamplerConfig.refill_fraction must be in (0, 1], got {self.refill_fraction!r}")
        for name, allowed in (("attention_kernel", ATTENTION_KERNELS), ("layer_loop", LAYER_LOOPS),
                              ("kv_layout", KV_LAYOUTS), ("matmul_kernel", MATMUL_KERNELS),
                              ("tail_rows", TAIL_ROWS)):
            if getattr(self, name) not in allowed:
                raise SamplerError(f"SamplerConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def max_cached_tokens(self) -> int:
        return self.max_pages_per_seq * self.page_size


def validate_prompt(tokens: Sequence[int], cfg: QwenConfig, scfg: SamplerConfig, what: str) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1 or arr.size == 0:
        raise SamplerError(
            f"{what}: a prompt must be a non-empty 1-D list of token ids, got shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise SamplerError(f"{what}: token ids must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= cfg.vocab_size:
        raise SamplerError(
            f"{what}: token id out of range [0, {cfg.vocab_size}): min {arr.min()}, max {arr.max()}"
        )
    if arr.size > scfg.max_prefill_length:
        raise SamplerError(f"{what}: prompt length {arr.size} > max_prefill_length {scfg.max_prefill_length}")
    return arr.astype(np.int32)


def validate_budget(prompt_len: int, budget: int, scfg: SamplerConfig, what: str) -> int:
    if int(budget) != budget or budget < 1:
        raise SamplerError(f"{what}: max_new_tokens must be an int >= 1, got {budget!r}")
    if cached_positions(prompt_len, int(budget)) > scfg.max_cached_tokens:
        raise SamplerError(
            f"{what}: prompt {prompt_len} + budget {budget} - 1 tokens exceed max_pages_per_seq * page_size "
            "= "
            f"{scfg.max_cached_tokens}"
        )
    return int(budget)


def prefill_bucket(length: int, page_size: int) -> int:
    """Padded prefill length: a shape bucket of at least one page, rounded up to whole pages."""
    return round_up(shape_bucket(length, page_size), page_size)


class PageAllocator:
    """Free list of page ids with reference counts (a shared prefix page is counted once per sequence)."""

    def __init__(self, num_pages: int) -> None:
        if num_pages <= 0:
            raise SamplerError(f"PageAllocator: num_pages must be positive, got {num_pages}")
        self.num_pages = int(num_pages)
        self._free: list[int] = list(range(self.num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._refs = np.zeros(self.num_pages, np.int32)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, page: int) -> int:
        return int(self._refs[page])

    def check(self, needed: int, what: str) -> None:
        """Raise PoolExhaustedError (changing nothing) unless ``needed`` pages are free."""
        if needed > len(self._free):
            raise PoolExhaustedError(
                f"page pool exhausted: {what} needs {needed} pages, {len(self._free)} of {self.num_pages} "
                f"are free; raise SamplerConfig.num_pages or send fewer / shorter requests"
            )

    def allocate(self, n: int, refs: int = 1, what: str = "request") -> list[int]:
        self.check(n, what)
        pages = [self._free.pop() for _ in range(n)]
        self._refs[pages] = refs
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; a page returns to the free list at zero references."""
        for p in pages:
            if self._refs[p] <= 0:
                raise SamplerError(f"PageAllocator: page {p} released more often than it was referenced")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(int(p))


@dataclasses.dataclass
class GroupPages:
    """Pages of one prefilled prompt and the samples that continue it."""

    prompt_len: int
    budgets: list[int]
    shared: list[int]
    private: list[list[int]]
    page_size: int

    @property
    def num_samples(self) -> int:
        return len(self.budgets)

    @property
    def has_partial(self) -> bool:
        return self.prompt_len % self.page_size != 0

    def table(self, i: int) -> list[int]:
        return self.shared + self.private[i]

    def partial_page(self, i: int) -> int | None:
        """Sample i's private copy of the prompt's partial last page (None when P is page-aligned)."""
        return self.private[i][0] if self.has_partial else None

    def release(self, alloc: PageAllocator) -> None:
        for i in range(self.num_samples):
            alloc.release(self.table(i))


def group_page_counts(prompt_len: int, budgets: Sequence[int], page_size: int) -> tuple[int, list[int]]:
    """(shared full prompt pages, private pages per sample) for the layout in the module docstring."""
    shared = prompt_len // page_size
    private = [cdiv(cached_positions(prompt_len, n), page_size) - shared for n in budgets]
    return shared, private


def allocate_groups(
    alloc: PageAllocator, prompt_lens: Sequence[int], budgets: Sequence[Sequence[int]], page_size: int
) -> list[GroupPages]:
    """Allocate every group of a request, or nothing: the total is checked against the free list first."""
    counts = [group_page_counts(p, b, page_size) for p, b in zip(prompt_lens, budgets, strict=True)]
    total = sum(s + sum(priv) for s, priv in counts)
    detail = ", ".join(f"group {g}: {s + sum(priv)}" for g, (s, priv) in enumerate(counts[:8]))
    alloc.check(total, f"the request ({len(counts)} groups; {detail}{', ...' if len(counts) > 8 else ''})")
    groups = []
    for p, b, (s, priv) in zip(prompt_lens, budgets, counts, strict=True):
        shared = alloc.allocate(s, refs=len(b))
        private = [alloc.allocate(n) for n in priv]
        groups.append(GroupPages(int(p), [int(x) for x in b], shared, private, page_size))
    return groups


@dataclasses.dataclass
class PageArrays:
    """Device-ready index arrays for inserting prefilled groups into decode slots.

    Out-of-range values mark padding and turn the corresponding device writes into no-ops.
    shared_dest [N, J]  pool page receiving prefill page j of prompt n (num_pages: no write)
    Per inserted sample e (M entries, padded):
    slot [M]            its decode slot (num_slots: padding, nothing inserted)
    tables [M, P]       its page table (unused entries 0: masked by length and never written)
    partial_dest [M]    pool page receiving its copy of the prompt's partial page (num_pages: none)
    prefix [M], sample [M], budgets [M]   prompt row, index within the group, new-token budget
    """

    shared_dest: np.ndarray
    slot: np.ndarray
    tables: np.ndarray
    partial_dest: np.ndarray
    prefix: np.ndarray
    sample: np.ndarray
    budgets: np.ndarray


def build_page_arrays(
    groups: Sequence[GroupPages],
    num_prefixes: int,
    prefill_pages: int,
    num_entries: int,
    table_width: int,
    num_pages: int,
    num_slots: int,
    slots: Sequence[int] | None = None,
    private_only: bool = False,
) -> PageArrays:
    """Lay out ``groups`` (group g = prompt row g) into fixed-shape arrays. Entries follow group order;
    entry e goes to decode slot ``slots[e]`` (default: slot e). ``private_only``: tables list each sample's
    private pages only (cascade attention reads the shared prefix pages from a group-level table)."""
    shared_dest = np.full((num_prefixes, prefill_pages), num_pages, np.int32)
    slot = np.full((num_entries,), num_slots, np.int32)
    tables = np.zeros((num_entries, table_width), np.int32)
    partial_dest = np.full((num_entries,), num_pages, np.int32)
    prefix = np.zeros((num_entries,), np.int32)
    sample = np.zeros((num_entries,), np.int32)
    budgets = np.zeros((num_entries,), np.int32)
    e = 0
    for g, grp in enumerate(groups):
        shared_dest[g, : len(grp.shared)] = grp.shared
        for i in range(grp.num_samples):
            row = grp.private[i] if private_only else grp.table(i)
            if len(row) > table_width:
                raise SamplerError(
                    f"group {g} sample {i}: {len(row)} pages exceed the page table width {table_width}"
                )
            slot[e] = slots[e] if slots is not None else e
            tables[e, : len(row)] = row
            part = grp.partial_page(i)
            partial_dest[e] = num_pages if part is None else part
            prefix[e], sample[e], budgets[e] = g, i, grp.budgets[i]
            e += 1
    return PageArrays(shared_dest, slot, tables, partial_dest, prefix, sample, budgets)

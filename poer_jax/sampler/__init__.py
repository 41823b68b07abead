"""Paged-KV sampler: prefill each group's prompt (question + cached prefix) once, decode G continuations.

Public API:
  GroupSampler, SampleOutput                         batch_sampler.py (what the trainer calls: data-parallel
                                                     over the mesh's batch axes, continuous batching)
  PagedEngine, Prefix, DecodeState, ResultTokens     engine.py (JetStream-shaped prefill / insert / generate)
  SamplerConfig, PageAllocator, SamplerError, PoolExhaustedError   pages.py (host-side planning)
  SamplingParams, sample_tokens, top_p_threshold     sampling.py
  paged_decode_attention                             paged_attention.py
Inside: scheduler.py (groups -> devices, admission, page release), sharded.py (the device programs under
shard_map), budget.py (KV pages from a memory budget), programs.py (the programs for the plan command),
pallas_gpu.py / pallas_tpu.py (JAX's Pallas paged-attention kernels behind paged_decode_attention,
``SamplerConfig.attention_kernel``), compiles.py (compilation counting: the no-recompile tests, benchmarks).

Owns: generation from a model's weights (KV pool, pages, decode programs, sampling), given a SamplerConfig.
May import: ``model``, ``tasks`` and the leaf modules (``program_spec``); not ``rl``, ``poer`` or ``rewards``
(its siblings), nor anything above.
"""

from poer_jax.sampler.batch_sampler import GroupSampler, SampleOutput
from poer_jax.sampler.engine import (
    FINISH_BUDGET,
    FINISH_EOS,
    FINISH_NONE,
    FINISH_REASONS,
    DecodeState,
    PagedEngine,
    Prefix,
    ResultTokens,
)
from poer_jax.sampler.paged_attention import paged_decode_attention
from poer_jax.sampler.pages import PageAllocator, PoolExhaustedError, SamplerConfig, SamplerError
from poer_jax.sampler.sampling import SamplingParams, sample_tokens, top_p_threshold

__all__ = [
    "FINISH_BUDGET",
    "FINISH_EOS",
    "FINISH_NONE",
    "FINISH_REASONS",
    "DecodeState",
    "GroupSampler",
    "PageAllocator",
    "PagedEngine",
    "PoolExhaustedError",
    "Prefix",
    "ResultTokens",
    "SampleOutput",
    "SamplerConfig",
    "SamplerError",
    "SamplingParams",
    "paged_decode_attention",
    "sample_tokens",
    "top_p_threshold",
]

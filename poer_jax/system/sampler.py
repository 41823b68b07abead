"""The sampler from the config: sampling parameters, the ``SamplerConfig`` (KV pages, decode slots, kernels)
on a mesh, and the ``GroupSampler`` a run feeds its trained weights to. The plan takes the same
``SamplerConfig`` (``sampler_config_for``) and the sampler's weights abstractly (``abstract_decode_params``).
Errors name the config key that caused them."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from poer_jax.model.adapters import merge
from poer_jax.model.config import QwenConfig
from poer_jax.model.lora import LoraConfig
from poer_jax.model.qwen import Params, param_shapes
from poer_jax.model.sharding import decode_param_shardings, device_bytes
from poer_jax.sampler import GroupSampler, SamplerConfig, SamplerError, SamplingParams
from poer_jax.sampler.budget import budget_bytes, device_free_bytes, kv_bytes_per_page, pages_for_bytes
from poer_jax.sampler.pages import cdiv
from poer_jax.sampler.sharded import head_shards
from poer_jax.system.config import ConfigError, apply_overrides
from poer_jax.system.data import count_jsonl_rows
from poer_jax.system.multihost import ProcessLocalParams, ProcessRows
from poer_jax.system.text import TextSide


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


EVAL_BATCH = 64  # problems per sampler call of the held-out evaluation (poer_jax.eval.evaluator.evaluate)


def sampling_params(cfg: ml_collections.ConfigDict) -> tuple[SamplingParams, SamplingParams]:
    """(rollout sampling, evaluation sampling)."""
    r, e = cfg.rollout, cfg.eval
    return (SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p),
            SamplingParams(temperature=e.temperature, top_p=e.top_p))


def sampler_config(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, sampler_mesh: Mesh, *,
                   eos_ids: tuple[int, ...] = (), pad_id: int = 0, process_count: int = 1,
                   num_eval_problems: int = 0, free_bytes: float | None = None) -> SamplerConfig:
    """The sampler's limits per device of ``sampler_mesh``'s batch axes (the process-local sampler mesh).

    Pages: ``rollout.num_pages`` when set, else the KV budget (``rollout.kv_cache_fraction`` x free device
    memory, ``free_bytes`` when given (the plan), or ``rollout.kv_cache_gb``), capped at what the device's
    share of the largest call (a step, the cache fill, an evaluation batch) can use at once. Slots: that
    share. A budget that cannot hold one group at full length fails here, naming the keys."""
    R = cfg.rollout
    new_tokens = max(R.max_completion_len, cfg.eval.max_new_tokens or 0)
    max_seq = cfg.data.max_prompt_len + new_tokens
    pages_per_seq = cdiv(max_seq, R.page_size) + 1
    shards = sampler_mesh.shape["data"] * sampler_mesh.shape["fsdp"]
    q_local = cdiv(cfg.data.questions_per_step, process_count)  # groups of a step on this process
    eval_groups = min(EVAL_BATCH, cdiv(num_eval_problems, process_count)) if num_eval_problems else 0
    # (groups, samples per group) of each kind of call: a step, the cache fill (G = 1), an evaluation batch
    calls = [(q_local, R.group_size), (q_local * R.group_size, 1), (eval_groups, cfg.eval.num_samples)]
    group_pages = [pages_per_seq * (1 + g) for n, g in calls if n]  # shared prompt + G private, at full length
    need = max(cdiv(n, shards) * (1 + g) * pages_per_seq for n, g in calls if n)
    slots = _pow2(max(cdiv(n, shards) * g for n, g in calls if n))
    if R.max_decode_slots:  # fewer rows decoded at once: smaller decode temporaries, more refill rounds
        slots = min(slots, _pow2(max(R.max_decode_slots, *(g for n, g in calls if n))))
    kv_dtype = cfg.model.dtype
    key = ("rollout.num_pages" if R.num_pages else
           "rollout.kv_cache_fraction" if R.kv_cache_fraction is not None else "rollout.kv_cache_gb")
    if R.num_pages:
        num_pages = R.num_pages
    else:
        try:
            if R.kv_cache_fraction is not None and free_bytes is not None:
                budget = R.kv_cache_fraction * free_bytes
            else:
                budget = budget_bytes(R.kv_cache_gb, R.kv_cache_fraction, sampler_mesh.devices.flat)
            num_pages = min(pages_for_bytes(budget, mcfg, R.page_size, kv_dtype, head_shards(mcfg, sampler_mesh)),
                            need)
        except SamplerError as e:
            raise ConfigError(f"config key '{key}': {e}") from e
    if num_pages < max(group_pages):
        per_page = kv_bytes_per_page(mcfg, R.page_size, kv_dtype, head_shards(mcfg, sampler_mesh))
        raise ConfigError(
            f"config key '{key}': {num_pages} KV pages per device ({num_pages * per_page / 1e9:.3g} GB) cannot hold "
            f"one group at full length ({max(group_pages)} pages = {max(group_pages) * per_page / 1e9:.3g} GB: "
            "prompt + G samples of data.max_prompt_len + rollout.max_completion_len tokens); raise it or shorten "
            "those")
    return SamplerConfig(page_size=R.page_size, num_pages=num_pages, max_slots=slots,
                         max_pages_per_seq=_pow2(pages_per_seq), max_prefill_length=max_seq,
                         eos_ids=tuple(eos_ids), pad_id=pad_id, sampling=sampling_params(cfg)[0], kv_dtype=kv_dtype,
                         attention_kernel=R.attention_kernel, layer_loop=R.layer_loop, kv_layout=R.kv_layout,
                         matmul_kernel=R.matmul_kernel, fixed_tables=R.fixed_page_tables)


def eval_problems(cfg: ml_collections.ConfigDict) -> int:
    """The held-out problems a run of ``cfg`` evaluates, as far as they size the sampler, without loading them:
    none when evaluation is off or has no file, the rows of ``data.eval_path`` when it is a local JSONL file,
    else as many as one evaluation call takes (``EVAL_BATCH``: more do not change the sampler)."""
    if not (cfg.eval.enabled and cfg.data.eval_path):
        return 0
    return count_jsonl_rows(cfg.data.eval_path, cfg.data.eval_limit) or EVAL_BATCH


def sampler_config_for(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, mesh: Mesh,
                       free_bytes: float | None = None) -> SamplerConfig:
    """The run's ``SamplerConfig`` on ``mesh`` as ``PoerTrainer`` builds it (one process holding the whole
    mesh; no tokenizer: EOS / pad ids do not change shapes; the held-out problems counted by ``eval_problems``).
    ``free_bytes``: the device memory left for the KV pool, used by ``rollout.kv_cache_fraction``. When that
    leaves no room for one group at full length, the pool is planned at that minimum instead, so the plan shows
    what does not fit."""

    def build(c: ml_collections.ConfigDict) -> SamplerConfig:
        return sampler_config(c, mcfg, mesh, eos_ids=(0,), pad_id=0, process_count=1,
                              num_eval_problems=eval_problems(c), free_bytes=free_bytes)

    try:
        return build(cfg)
    except ConfigError:
        r = cfg.rollout
        if free_bytes is None or r.num_pages or r.kv_cache_fraction is None:
            raise
        max_seq = cfg.data.max_prompt_len + max(r.max_completion_len, cfg.eval.max_new_tokens or 0)
        pages = (-(-max_seq // r.page_size) + 1) * (1 + max(r.group_size, cfg.eval.num_samples))
        return build(apply_overrides(cfg, [f"rollout.num_pages={pages}"]))


def abstract_decode_params(mcfg: QwenConfig, mesh: Mesh) -> Any:
    """The sampler's weights in the decode layout and compute dtype (what ``build_sampler`` reshards the trained
    weights to), abstract: their per-device bytes before the sampler exists. (The per-layer form the sampler
    then holds on a CPU is ``poer_jax.sampler.programs``'s.)"""
    return jax.tree.map(lambda s, sd: jax.ShapeDtypeStruct(s, mcfg.jnp_dtype, sharding=sd), param_shapes(mcfg),
                        decode_param_shardings(mcfg, mesh), is_leaf=lambda x: isinstance(x, tuple))


def kv_free_bytes(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, sampler_mesh: Mesh) -> float | None:
    """What ``rollout.kv_cache_fraction`` takes its share of: the smallest free memory over the sampler's
    devices less the sampler's weights, not placed yet (None: the backend reports no memory, or no fraction)."""
    if cfg.rollout.kv_cache_fraction is None or cfg.rollout.num_pages:
        return None
    free = [device_free_bytes(d) for d in sampler_mesh.devices.flat]
    if any(f is None for f in free):
        return None  # sampler_config names the key and says the backend reports no memory
    return max(min(f for f in free if f is not None) - device_bytes(abstract_decode_params(mcfg, sampler_mesh)), 0)


def build_sampler(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, mesh: Mesh, rows: ProcessRows,
                  params: Params, text: TextSide, num_eval_problems: int, *, base: Params | None = None,
                  lora: LoraConfig | None = None) -> tuple[GroupSampler, ProcessLocalParams]:
    """The group sampler on this process's devices (data-parallel over their batch axes), and the reshard
    that feeds it the trained weights (decode layout, compute dtype). With ``lora`` the trained weights
    ``params`` are adapters on the frozen ``base``: the sampler decodes with them merged (W + (alpha / r) A B,
    merged in the reshard's program), at the speed of plain weights."""
    combine = None if lora is None else partial(merge, lora=lora)
    local = ProcessLocalParams(mesh, mcfg, frozen=base, combine=combine)  # multi-host: each samples its questions
    scfg = sampler_config(cfg, mcfg, local.mesh, eos_ids=text.eos_ids, pad_id=text.pad_id,
                          process_count=rows.count, num_eval_problems=num_eval_problems,
                          free_bytes=kv_free_bytes(cfg, mcfg, local.mesh))
    return GroupSampler(local(params), mcfg, scfg, mesh=local.mesh), local

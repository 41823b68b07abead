"""Named builders for the parts of a training run, in the order ``PoerTrainer`` assembles them.

Each takes the validated config (and what earlier builders made) and returns one part: the device mesh,
the tokenizer, the prompts, the update step's configs, the sampler, the reward pools, the data iterator,
the truncation rule and the empty cache pool. Errors name the config key that caused them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from poer_jax import poer
from poer_jax.model.config import QwenConfig
from poer_jax.model.qwen import Params
from poer_jax.model.sharding import make_mesh
from poer_jax.rl import LossConfig
from poer_jax.rl.optim import OptimConfig
from poer_jax.rl.update import Trainer
from poer_jax.sampler import GroupSampler, SamplerConfig, SamplerError, SamplingParams
from poer_jax.sampler.budget import budget_bytes, device_free_bytes, kv_bytes_per_page, pages_for_bytes
from poer_jax.sampler.pages import cdiv
from poer_jax.sampler.sharded import head_shards
from poer_jax.train import preflight, setup
from poer_jax.train.data import (
    DataError,
    EpochIterator,
    PromptConfig,
    TokenizedPrompts,
    tokenize_prompts,
)
from poer_jax.train.multihost import ProcessLocalParams, ProcessRows
from poer_jax.train.reward_pool import RewardPool, RewardSpec


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


EVAL_BATCH = 64  # problems per sampler call of the held-out evaluation (poer_jax.eval.evaluator.evaluate)


# ---- devices and text ---------------------------------------------------------------------------------
def build_mesh(cfg: ml_collections.ConfigDict) -> tuple[Mesh, ProcessRows]:
    """The (data, fsdp, tensor) mesh from ``mesh.*`` and this process's view of its batch rows."""
    devices = jax.devices()[: cfg.mesh.num_devices] if cfg.mesh.num_devices else None
    try:
        mesh = make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}, devices)
    except ValueError as e:
        raise setup.ConfigError(f"config section 'mesh': {e}") from e
    return mesh, ProcessRows(mesh)  # this process's rows <-> global arrays (identity on one process)


def check_before_work(cfg: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Fail before loading anything when the batch rows do not divide the batch devices, or when what the
    run keeps on every device (``plan.build.resident_estimate``) exceeds the device's memory (where the
    backend reports it: GPU, TPU)."""
    from poer_jax.plan.build import check_batch_layout, check_resident_memory, model_shapes

    check_batch_layout(cfg, mesh)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    stats = (local[0].memory_stats() if local else None) or {}  # this process's device: no remote query
    if stats.get("bytes_limit"):
        check_resident_memory(cfg, model_shapes(cfg)[0], mesh, float(stats["bytes_limit"]))


@dataclasses.dataclass(frozen=True)
class TextSide:
    """Tokenizer, its EOS ids and pad id."""

    tokenizer: Any
    eos_ids: tuple[int, ...]
    pad_id: int


def build_text(cfg: ml_collections.ConfigDict) -> TextSide:
    tok_path = cfg.model.tokenizer_path or cfg.model.path
    if tok_path is None:
        raise setup.ConfigError("config key 'model.tokenizer_path' is required with model.preset")
    tokenizer = setup.load_tokenizer(tok_path)
    eos_ids, pad_id = setup.eos_and_pad(tokenizer, cfg.model.path)
    return TextSide(tokenizer, eos_ids, pad_id)


@dataclasses.dataclass
class Prompts:
    """The training rows and their tokenized prompts; the held-out prompts when evaluation is on."""

    train_rows: Any
    train: TokenizedPrompts
    eval: TokenizedPrompts | None


def build_prompts(cfg: ml_collections.ConfigDict, tokenizer: Any) -> Prompts:
    """Load and tokenize the training (and held-out) rows; errors name the config key, the file and the row."""
    pcfg = PromptConfig(chat_template=cfg.data.chat_template, max_prompt_len=cfg.data.max_prompt_len,
                        on_too_long=cfg.data.on_too_long,
                        **({"system_prompt": cfg.data.system_prompt} if cfg.data.system_prompt is not None else {}))
    rows = preflight.load_data(cfg, "data.train_path", limit=cfg.data.limit)
    train = _tokenize(tokenizer, rows, pcfg, "data.train_path")
    if len(train) < cfg.data.questions_per_step:
        raise setup.ConfigError(
            f"config key 'data.questions_per_step' is {cfg.data.questions_per_step}, but data.train_path "
            f"({cfg.data.train_path}) has only {len(train)} usable rows" +
            (f" ({train.num_skipped} skipped as longer than data.max_prompt_len)" if train.num_skipped else ""))
    held_out = None
    if cfg.data.eval_path and cfg.eval.enabled:
        eval_rows = preflight.load_data(cfg, "data.eval_path", limit=cfg.data.eval_limit)
        held_out = _tokenize(tokenizer, eval_rows, pcfg, "data.eval_path")
    return Prompts(rows, train, held_out)


def _tokenize(tokenizer: Any, rows: Any, pcfg: PromptConfig, key: str) -> TokenizedPrompts:
    try:
        return tokenize_prompts(tokenizer, rows, pcfg)
    except DataError as e:
        raise DataError(f"config key {key!r}: {e}") from e
    except ValueError as e:  # chat_template='always' without a template
        raise setup.ConfigError(f"config key 'data.chat_template': {e}") from e


# ---- the update step ----------------------------------------------------------------------------------
def build_optim_config(cfg: ml_collections.ConfigDict) -> OptimConfig:
    o = cfg.optim
    try:
        return OptimConfig(
            learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
            total_steps=cfg.train.max_steps * o.num_iterations * o.num_minibatches,
            min_lr_ratio=o.min_lr_ratio, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
            max_grad_norm=o.max_grad_norm or None)
    except ValueError as e:  # e.g. warmup longer than the run: name the config keys
        raise setup.ConfigError(f"config section 'optim': {e}") from e


def build_loss_config(cfg: ml_collections.ConfigDict) -> LossConfig:
    lc = cfg.loss
    return LossConfig(objective=lc.objective, epsilon_low=lc.epsilon_low, epsilon_high=lc.epsilon_high,
                      dual_clip=lc.dual_clip, beta=lc.beta, aggregation=lc.aggregation,
                      max_completion_len=cfg.rollout.max_completion_len)


def build_update_trainer(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, mesh: Mesh) -> Trainer:
    """The jitted update step. Log-probs at the sampling temperature (TRL); greedy rollouts train at T = 1."""
    return Trainer(mcfg, build_loss_config(cfg), build_optim_config(cfg), mesh=mesh,
                   temperature=cfg.rollout.temperature or 1.0, micro_batches=cfg.optim.micro_batches,
                   chunk_size=cfg.loss.logprob_chunk)


# ---- rollout ------------------------------------------------------------------------------------------
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
            raise setup.ConfigError(f"config key '{key}': {e}") from e
    if num_pages < max(group_pages):
        per_page = kv_bytes_per_page(mcfg, R.page_size, kv_dtype, head_shards(mcfg, sampler_mesh))
        raise setup.ConfigError(
            f"config key '{key}': {num_pages} KV pages per device ({num_pages * per_page / 1e9:.3g} GB) cannot hold "
            f"one group at full length ({max(group_pages)} pages = {max(group_pages) * per_page / 1e9:.3g} GB: "
            "prompt + G samples of data.max_prompt_len + rollout.max_completion_len tokens); raise it or shorten "
            "those")
    return SamplerConfig(page_size=R.page_size, num_pages=num_pages, max_slots=slots,
                         max_pages_per_seq=_pow2(pages_per_seq), max_prefill_length=max_seq,
                         eos_ids=tuple(eos_ids), pad_id=pad_id, sampling=sampling_params(cfg)[0], kv_dtype=kv_dtype,
                         attention_kernel=R.attention_kernel, layer_loop=R.layer_loop, kv_layout=R.kv_layout,
                         matmul_kernel=R.matmul_kernel, fixed_tables=R.fixed_page_tables)


def kv_free_bytes(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, sampler_mesh: Mesh) -> float | None:
    """What ``rollout.kv_cache_fraction`` takes its share of: the smallest free memory over the sampler's
    devices less the sampler's weights, not placed yet (None: the backend reports no memory, or no fraction)."""
    if cfg.rollout.kv_cache_fraction is None or cfg.rollout.num_pages:
        return None
    from poer_jax.plan.build import abstract_decode_params
    from poer_jax.plan.compile import device_bytes

    free = [device_free_bytes(d) for d in sampler_mesh.devices.flat]
    if any(f is None for f in free):
        return None  # sampler_config names the key and says the backend reports no memory
    return max(min(f for f in free if f is not None) - device_bytes(abstract_decode_params(mcfg, sampler_mesh)), 0)


def build_sampler(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, mesh: Mesh, rows: ProcessRows,
                  params: Params, text: TextSide, num_eval_problems: int
                  ) -> tuple[GroupSampler, ProcessLocalParams]:
    """The group sampler on this process's devices (data-parallel over their batch axes), and the reshard
    that feeds it the trained weights (decode layout, compute dtype)."""
    local = ProcessLocalParams(mesh, mcfg)  # multi-host: each process samples its own questions
    scfg = sampler_config(cfg, mcfg, local.mesh, eos_ids=text.eos_ids, pad_id=text.pad_id,
                          process_count=rows.count, num_eval_problems=num_eval_problems,
                          free_bytes=kv_free_bytes(cfg, mcfg, local.mesh))
    return GroupSampler(local(params), mcfg, scfg, mesh=local.mesh), local


# ---- rewards, data order, POER ------------------------------------------------------------------------
def reward_specs(cfg: ml_collections.ConfigDict) -> list[RewardSpec]:
    weights = cfg.reward.weights or [1.0] * len(cfg.reward.functions)
    specs = []
    for name, w in zip(cfg.reward.functions, weights, strict=True):
        kwargs = {"max_len": cfg.reward.cosine_max_len} if name == "cosine" else {}
        specs.append(RewardSpec(name, float(w), kwargs))
    return specs


def build_rewards(cfg: ml_collections.ConfigDict) -> tuple[RewardPool, RewardPool]:
    """(the reward pool of training, the accuracy grader of evaluation: the same pool when it has accuracy)."""
    rewards = RewardPool(reward_specs(cfg), num_workers=cfg.reward.num_workers, timeout_s=cfg.reward.timeout_s,
                         on_error=cfg.reward.on_error)
    if "accuracy" in rewards.names:
        return rewards, rewards
    try:
        return rewards, RewardPool(["accuracy"], num_workers=1, timeout_s=cfg.reward.timeout_s, on_error="zero")
    except BaseException:
        rewards.close()
        raise


def build_iterator(cfg: ml_collections.ConfigDict, num_questions: int) -> EpochIterator:
    try:  # each process iterates over its share of every global batch
        return EpochIterator(num_questions, cfg.data.questions_per_step, seed=cfg.seed,
                             process_index=jax.process_index(), process_count=jax.process_count())
    except ValueError as e:
        raise setup.ConfigError(f"config key 'data.questions_per_step': {e}") from e


def build_truncation(cfg: ml_collections.ConfigDict) -> poer.TruncationConfig:
    c = cfg.cache
    return poer.TruncationConfig(max_completion_len=cfg.rollout.max_completion_len, limit=c.truncation,
                                 max_truncation=c.max_truncation, fraction=float(c.truncation_fraction),
                                 mode=c.truncation_mode, budget=c.budget,
                                 max_continuation=cfg.rollout.max_continuation_len)


def build_empty_pool(num_questions: int, max_len: int, pad_id: int, mesh: Mesh) -> poer.CachePool:
    """An empty cache pool (one row per question), created in place with the pool's sharding."""

    def empty() -> poer.CachePool:
        return poer.create(num_questions, max_len, pad_id)

    return jax.jit(empty, out_shardings=poer.pool_sharding(jax.eval_shape(empty), mesh))()

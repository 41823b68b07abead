"""The jitted policy update: exact gradient accumulation over micro-batches, AdamW, non-finite skip.

One step on a mini-batch of B rows split into k micro-batches M_1..M_k (rows b with b mod k = j):

    grad  = sum_j grad(loss_sum(M_j))  /  sum_j loss_denom(M_j)
    loss  = sum_j loss_sum(M_j)        /  sum_j loss_denom(M_j)

with (loss_sum, loss_denom) the pair of ``losses.compute_loss`` (paper Eq. 5-7). The denominators do not
depend on the parameters, so this equals the gradient of the full mini-batch loss exactly, for every
aggregation. Then theta <- AdamW(clip(grad)) (``optim.py``), unless the loss or the gradient is not
finite: then params, optimizer state and step are kept unchanged (a select on device, no host sync) and
the metrics report ``skipped`` = 1.

``Trainer.train_on_rollout`` runs mu iterations over one rollout (TRL's ``num_iterations``), each over
``num_minibatches`` mini-batches, with the old log-probs of Eq. 6's ratio fixed to the behaviour policy:
the sampler's when the batch carries them, otherwise computed by the trainer before the first update
(only needed when mu > 1 or there are several mini-batches; a single on-policy step uses
old = stop_gradient(logp), ratio 1). Reference log-probs (the KL term, beta > 0) are computed once per
rollout from ``ref_params``; with beta = 0 no reference model is needed.

LoRA (``Trainer(..., lora=LoraConfig)``, ``model/lora.py``): the train state holds the adapters and their Adam
moments only; the base weights are frozen in the compute dtype (``Trainer.base_params``), passed to every
program as an argument that is never donated nor copied, and the gradient is taken with respect to the adapters
alone. The KL reference is the same base weights with the adapters off: no reference copy.

Metric ``logp_diff/sampler_vs_trainer`` = mean over trained tokens of |old_logp - logp_trainer|, reported
for the first iteration only: at the first mini-batch it is the sampler-vs-trainer numerical mismatch
(0 when the trainer computed old_logp); later mini-batches of that iteration also see their own updates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from poer_jax.model.config import QwenConfig
from poer_jax.model.lora import LoraConfig
from poer_jax.model.qwen import Params
from poer_jax.model.sharding import BATCH_AXES, replicated
from poer_jax.rl.batch import RolloutBatch, constrain_parts, merge_rows, shard_batch, split_rows, split_rows_tree
from poer_jax.rl.logprobs import token_logprobs
from poer_jax.rl.lora import (
    abstract_trainable,
    dropout_key,
    freeze_base,
    merged_policy,
    new_adapters,
    policy_params,
    trainable_shardings,
)
from poer_jax.rl.losses import LossConfig, LossTerms, accumulate, compute_loss, finalize
from poer_jax.rl.optim import OptimConfig, make_optimizer

SAMPLER_DIFF = "logp_diff/sampler_vs_trainer"


class TrainState(NamedTuple):
    """params (the trained weights: the model's, or the LoRA adapters), optimizer state, and ``step`` = number of
    applied (not skipped) updates (int32 scalar)."""

    params: Params
    opt_state: optax.OptState
    step: jax.Array


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """micro_batches: k, gradient accumulation steps per mini-batch (its rows must divide by k).
    temperature: log-probs use logits / temperature (TRL), the sampling temperature.
    chunk_size: sequence positions per chunk of the log-prob scan.
    compute_entropy: report the mean token entropy (costs one softmax pass per chunk).
    """

    micro_batches: int = 1
    temperature: float = 1.0
    chunk_size: int = 256
    compute_entropy: bool = True

    def __post_init__(self) -> None:
        if self.micro_batches < 1:
            raise ValueError(f"update.py: UpdateConfig.micro_batches must be >= 1, got {self.micro_batches}")
        if not self.temperature > 0:
            raise ValueError(f"update.py: UpdateConfig.temperature must be > 0, got {self.temperature}")
        if self.chunk_size < 1:
            raise ValueError(
                f"update.py: UpdateConfig.chunk_size must be >= 1, got {self.chunk_size}"
            )


# ---- state and shardings ------------------------------------------------------------------------------


def opt_state_shardings(tx: optax.GradientTransformation, params_like: Any, params_shardings: Any,
                        mesh: Mesh) -> Any:
    """Shardings of ``tx.init(params)``: every params-shaped leaf (Adam's mu, nu) follows its parameter's
    sharding, everything else (counters) is replicated."""
    shapes = jax.eval_shape(tx.init, params_like)
    return optax.tree_map_params(tx, lambda _, s: s, shapes, params_shardings,
                                 transform_non_params=lambda _: replicated(mesh))


def _mesh_of(params: Params) -> Mesh | None:
    shardings = {getattr(x, "sharding", None) for x in jax.tree.leaves(params)}
    meshes = {s.mesh for s in shardings if isinstance(s, NamedSharding)}
    return meshes.pop() if len(meshes) == 1 and all(isinstance(s, NamedSharding) for s in shardings) else None


@jax.jit
def _copy_tree(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


def _init_state(tx: optax.GradientTransformation, params: Params, shardings: TrainState | None,
                copy: bool) -> TrainState:
    # The update donates the state's buffers; without a copy, donating would delete the caller's arrays
    # too (typically the very weights that also serve as the reference policy).
    target = None if shardings is None else shardings.params
    params = jax.device_put(params, target)
    if copy:
        # A jitted copy, because device_put(..., may_alias=False) still shares a replicated array's shard
        # with its single-device source.
        params = (_copy_tree if target is None else jax.jit(_copy_tree.__wrapped__, out_shardings=target))(params)
    if shardings is None:
        return TrainState(params, jax.jit(tx.init)(params), jnp.zeros((), jnp.int32))
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), shardings.step))


def create_train_state(params: Params, optim: OptimConfig | Trainer, *, copy: bool = True) -> TrainState:
    """TrainState(params, optimizer init, step 0) for an ``OptimConfig`` or a ``Trainer`` (then on its mesh).

    With an OptimConfig and ``params`` on one mesh (NamedSharding), the Adam moments get the same
    shardings as their parameters. ``copy`` (default) gives the state its own parameter buffers, so that
    donating the state in ``update_step`` leaves ``params`` usable (e.g. as the reference policy); pass
    False to save the memory of one copy when ``params`` is not used again.
    """
    if isinstance(optim, Trainer):
        return optim.create_train_state(params, copy=copy)
    if not isinstance(optim, OptimConfig):
        raise TypeError(f"update.py: create_train_state needs an OptimConfig or a Trainer, got {type(optim).__name__}")
    tx, _ = make_optimizer(optim)
    mesh = _mesh_of(params)
    if mesh is None:
        return _init_state(tx, params, None, copy)
    p_sh = jax.tree.map(lambda x: x.sharding, params)
    shardings = TrainState(p_sh, opt_state_shardings(tx, params, p_sh, mesh), replicated(mesh))
    return _init_state(tx, params, shardings, copy)


# ---- loss and gradients -------------------------------------------------------------------------------


def micro_batch_terms(params: Params, mb: RolloutBatch, model_cfg: QwenConfig, loss_cfg: LossConfig,
                      update_cfg: UpdateConfig) -> LossTerms:
    """Loss terms of one micro-batch (forward, chunked log-probs, ``compute_loss``) plus the
    sampler-vs-trainer log-prob difference when the batch carries old log-probs."""
    logp, entropy = token_logprobs(
        params, model_cfg, mb.tokens, mb.attention_mask, temperature=update_cfg.temperature,
        chunk_size=update_cfg.chunk_size, return_entropy=update_cfg.compute_entropy,
    )
    mask = mb.loss_mask.astype(bool)
    terms = compute_loss(logp, mb.old_logp, mb.ref_logp, mb.advantages, mask, loss_cfg, entropy=entropy)
    if mb.old_logp is None:
        return terms
    diff = jnp.where(mask, jnp.abs(mb.old_logp.astype(jnp.float32) - jax.lax.stop_gradient(logp)), 0.0)
    return terms._replace(
        metrics_sums={**terms.metrics_sums, SAMPLER_DIFF: jnp.sum(diff)},
        metrics_denoms={**terms.metrics_denoms, SAMPLER_DIFF: terms.num_tokens},
        metrics_max={**terms.metrics_max, SAMPLER_DIFF + "_max": jnp.max(diff)},
    )


def _identity_terms(shapes: LossTerms) -> LossTerms:
    """Neutral element of ``losses.accumulate`` with the structure of ``shapes``."""

    def fill(value: float) -> Any:
        return lambda s: jnp.full(s.shape, value, s.dtype)

    zero = fill(0.0)
    return LossTerms(
        loss_sum=zero(shapes.loss_sum), loss_denom=zero(shapes.loss_denom),
        metrics_sums=jax.tree.map(zero, shapes.metrics_sums),
        metrics_denoms=jax.tree.map(zero, shapes.metrics_denoms),
        metrics_max=jax.tree.map(fill(-jnp.inf), shapes.metrics_max),
        metrics_min=jax.tree.map(fill(jnp.inf), shapes.metrics_min),
        num_tokens=zero(shapes.num_tokens),
    )


def loss_and_grads(
    params: Params, batch: RolloutBatch, model_cfg: QwenConfig, loss_cfg: LossConfig, update_cfg: UpdateConfig,
    mesh: Mesh | None = None, *, frozen: Params | None = None, lora: LoraConfig | None = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, Params, dict[str, jax.Array]]:
    """(loss, float32 gradient, metrics) of a mini-batch, accumulated exactly over k micro-batches
    (``lax.scan``; see the module docstring). The gradient is 0 when no token is trained. With LoRA the gradient
    is with respect to the adapters ``params`` only (``frozen``: the base weights, a constant of the
    differentiation); ``key`` seeds the adapters' dropout, folded with the micro-batch index."""
    k = update_cfg.micro_batches
    B = batch.tokens.shape[0]
    if B % k:
        raise ValueError(f"update.py: {B} rows do not split into micro_batches={k} equal micro-batches")
    micro = constrain_parts(jax.tree.map(lambda x: split_rows(x, k), batch), mesh)

    def micro_loss(p: Params, mb: RolloutBatch, j: jax.Array) -> tuple[jax.Array, LossTerms]:
        mb_key = None if key is None else jax.random.fold_in(key, j)
        terms = micro_batch_terms(policy_params(p, frozen, lora, mb_key), mb, model_cfg, loss_cfg, update_cfg)
        return terms.loss_sum, terms

    grad_fn = jax.grad(micro_loss, has_aux=True)
    _, term_shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), jnp.int32(0))
    g0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if mesh is not None:
        g0 = jax.lax.with_sharding_constraint(g0, trainable_shardings(model_cfg, mesh, lora))

    def body(carry: tuple[Params, LossTerms], xs: tuple[RolloutBatch, jax.Array]
             ) -> tuple[tuple[Params, LossTerms], None]:
        g_acc, t_acc = carry
        g, t = grad_fn(params, *xs)
        return (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g), accumulate(t_acc, t)), None

    init = (g0, _identity_terms(term_shapes))
    (g_sum, terms), _ = jax.lax.scan(body, init, (micro, jnp.arange(k, dtype=jnp.int32)))
    loss, metrics = finalize(terms)
    denom = terms.loss_denom
    grads = jax.tree.map(lambda g: jnp.where(denom != 0, g / jnp.where(denom != 0, denom, 1), 0.0), g_sum)
    metrics["num_tokens"] = terms.num_tokens
    return loss, grads, metrics


# ---- one update ----------------------------------------------------------------------------------------


def update_step(
    state: TrainState, batch: RolloutBatch, frozen: Params | None = None, *, tx: optax.GradientTransformation,
    schedule: optax.Schedule, model_cfg: QwenConfig, loss_cfg: LossConfig, update_cfg: UpdateConfig,
    mesh: Mesh | None = None, lora: LoraConfig | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on a mini-batch (pure; ``Trainer`` jits it with donated state; ``frozen``, LoRA's
    base weights, is not donated).

    Metrics: loss, grad_norm (before clipping), lr (of this update), skipped (1.0 when the loss or the
    gradient was not finite and nothing changed), num_tokens, the loss metrics (clip_ratio/*, ratio/*,
    kl, entropy) and ``logp_diff/sampler_vs_trainer`` (+ ``_max``) when the batch carries old log-probs.
    LoRA dropout masks draw from fold_in(key(lora.seed) -> 1, step, micro-batch): a resumed run draws the same.
    """
    key = dropout_key(lora, state.step)
    loss, grads, metrics = loss_and_grads(state.params, batch, model_cfg, loss_cfg, update_cfg, mesh, frozen=frozen,
                                          lora=lora, key=key)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    def keep_if_bad(new: jax.Array, old: jax.Array) -> jax.Array:
        # Cast back so that the state's dtypes (and so the compiled signature and donation) never drift.
        return jnp.where(ok, new.astype(old.dtype), old)

    new_state = TrainState(
        params=jax.tree.map(keep_if_bad, new_params, state.params),
        opt_state=jax.tree.map(keep_if_bad, new_opt, state.opt_state),
        step=state.step + ok.astype(jnp.int32),
    )
    metrics.update(loss=loss, grad_norm=grad_norm, lr=jnp.asarray(schedule(state.step), jnp.float32),
                   skipped=(~ok).astype(jnp.float32))
    return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def compute_logps_impl(params: Params, batch: RolloutBatch, frozen: Params | None = None, *, model_cfg: QwenConfig,
                       update_cfg: UpdateConfig, mesh: Mesh | None = None, lora: LoraConfig | None = None) -> jax.Array:
    """float32 [B, T] log-probs of the batch's tokens (0 where ``loss_mask`` is False), no gradient, run over
    the same k micro-batches as the update so that peak memory matches it. ``params``: the model's weights, or
    with LoRA the adapters on the ``frozen`` base (``policy_params``; no dropout)."""
    model = policy_params(params, frozen, lora)
    k = update_cfg.micro_batches
    B = batch.tokens.shape[0]
    if B % k:
        raise ValueError(f"update.py: {B} rows do not split into micro_batches={k} equal micro-batches")
    parts = constrain_parts(
        jax.tree.map(lambda x: split_rows(x, k), (batch.tokens, batch.attention_mask, batch.loss_mask)), mesh
    )

    def one(part: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        tokens, attention, loss_mask = part
        logp, _ = token_logprobs(model, model_cfg, tokens, attention, temperature=update_cfg.temperature,
                                 chunk_size=update_cfg.chunk_size)
        return jnp.where(loss_mask.astype(bool), logp, 0.0)

    return jax.lax.stop_gradient(merge_rows(jax.lax.map(one, parts)))


# ---- the trainer ---------------------------------------------------------------------------------------


class Trainer:
    """Holds the configs and the compiled functions of the policy update (optionally on a mesh).

    ``Trainer(model_cfg, loss_cfg, optim_cfg, update_cfg=None, mesh=None, lora=None, **fields)``: ``fields``
    override ``UpdateConfig`` fields (micro_batches, temperature, chunk_size, compute_entropy).
    With a mesh, parameters follow ``poer_jax.model.sharding.param_shardings``, Adam moments follow their
    parameters, batches are sharded over ("data", "fsdp") and metrics are replicated.
    ``update_step`` / ``run_updates`` / ``train_on_rollout`` donate the state they are given: use only the
    returned state afterwards.
    With ``lora`` the state holds the adapters (sharded by ``model.adapters.adapter_shardings``) and the trainer
    holds the frozen base weights (``base_params``, compute dtype, set by ``create_train_state``).
    """

    def __init__(self, model_cfg: QwenConfig, loss_cfg: LossConfig, optim_cfg: OptimConfig,
                 update_cfg: UpdateConfig | None = None, *, mesh: Mesh | None = None, lora: LoraConfig | None = None,
                 **fields: Any) -> None:
        for name, value, kind in (("loss_cfg", loss_cfg, LossConfig), ("optim_cfg", optim_cfg, OptimConfig)):
            if not isinstance(value, kind):
                raise TypeError(f"update.py: Trainer {name} must be a {kind.__name__}, got {type(value).__name__}")
        update_cfg = UpdateConfig() if update_cfg is None else update_cfg
        known = {f.name for f in dataclasses.fields(UpdateConfig)}
        if set(fields) - known:
            raise TypeError(f"update.py: Trainer got unknown arguments {sorted(set(fields) - known)}; "
                            f"UpdateConfig fields are {sorted(known)}")
        self.model_cfg, self.loss_cfg, self.optim_cfg = model_cfg, loss_cfg, optim_cfg
        self.update_cfg = dataclasses.replace(update_cfg, **fields)
        self.mesh, self.lora = mesh, lora
        self.base_params: Params | None = None  # LoRA's frozen base weights (create_train_state)
        self.tx, self.schedule = make_optimizer(optim_cfg)
        step = functools.partial(update_step, tx=self.tx, schedule=self.schedule, model_cfg=model_cfg,
                                 loss_cfg=loss_cfg, update_cfg=self.update_cfg, mesh=mesh, lora=lora)
        logps = functools.partial(compute_logps_impl, model_cfg=model_cfg, update_cfg=self.update_cfg, mesh=mesh,
                                  lora=lora)
        if mesh is None:
            self.state_shardings = None
            self._step = jax.jit(step, donate_argnums=0)
            self._logps = jax.jit(logps)
            self._split = jax.jit(split_rows_tree, static_argnums=1)
        else:
            p_sh = trainable_shardings(model_cfg, mesh, lora)
            p_shapes = self.abstract_trainable(model_cfg.jnp_param_dtype)
            self.state_shardings = TrainState(p_sh, opt_state_shardings(self.tx, p_shapes, p_sh, mesh),
                                              replicated(mesh))
            self._step = jax.jit(step, donate_argnums=0, out_shardings=(self.state_shardings, replicated(mesh)))
            self._logps = jax.jit(logps, out_shardings=NamedSharding(mesh, P(BATCH_AXES)))
            self._split = jax.jit(split_rows_tree, static_argnums=1,
                                  out_shardings=NamedSharding(mesh, P(None, BATCH_AXES)))

    def mesh_context(self) -> contextlib.AbstractContextManager[Any]:
        """``jax.set_mesh(mesh)`` (or nothing without a mesh): the jitted programs are traced and run with the
        mesh set, so mesh-aware kernels (splash attention's ``shard_map``) split over its devices."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def abstract_trainable(self, dtype: Any) -> Any:
        """The trained weights (the model's, or the adapters) as ``jax.ShapeDtypeStruct`` of ``dtype``, without
        shardings."""
        return abstract_trainable(self.model_cfg, self.lora, dtype)

    def create_train_state(self, params: Params, *, copy: bool = True) -> TrainState:
        """Place ``params`` (on the mesh, if any) and initialise the optimizer state next to them; ``copy``
        as in the module-level ``create_train_state``. With LoRA, ``params`` become the frozen base
        (``base_params``: in the compute dtype, on the mesh; no copy when they are so already) and the state holds
        fresh adapters (A Kaiming-uniform from ``lora.seed``, B zero) and their optimizer state."""
        if self.lora is None:
            return _init_state(self.tx, params, self.state_shardings, copy)
        self.base_params = freeze_base(params, self.model_cfg, self.mesh)
        out_sh = None if self.state_shardings is None else self.state_shardings.params
        adapters = new_adapters(self.model_cfg, self.lora, out_sh)
        return _init_state(self.tx, adapters, self.state_shardings, copy=False)

    def _frozen(self) -> Params | None:
        if self.lora is not None and self.base_params is None:
            raise ValueError("update.py: a LoRA Trainer needs create_train_state(base weights) first")
        return self.base_params

    def policy_weights(self, state: TrainState) -> Params:
        """The policy as plain weights: ``state.params``, or with LoRA the base with the adapters merged
        (W + (alpha / r) A B, ``model.adapters.merge``; compute dtype), e.g. to evaluate or export it."""
        if self.lora is None:
            return state.params
        return merged_policy(self._frozen(), state.params, self.lora)

    def shard_batch(self, batch: RolloutBatch) -> RolloutBatch:
        return shard_batch(batch, self.mesh)

    def update_step(self, state: TrainState, batch: RolloutBatch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One jitted update on ``batch`` (a mini-batch); ``state`` is donated."""
        with self.mesh_context():
            return self._step(state, self.shard_batch(batch), self._frozen())

    def compute_logps(self, params: Params, batch: RolloutBatch, frozen: Params | None = None) -> jax.Array:
        """Jitted, chunked, gradient-free [B, T] log-probs (0 off ``loss_mask``): old or reference log-probs.
        ``params``: plain weights, or with LoRA the adapters on the ``frozen`` base weights."""
        with self.mesh_context():
            return self._logps(params, self.shard_batch(batch), frozen)

    def run_updates(
        self, state: TrainState, batch: RolloutBatch, *, num_iterations: int = 1, num_minibatches: int = 1,
        ref_params: Params | None = None, recompute_old_logp: bool = False,
    ) -> tuple[TrainState, list[dict[str, jax.Array]]]:
        """mu = ``num_iterations`` passes over ``batch``, each split into ``num_minibatches`` mini-batches
        (mini-batch j = rows b with b mod num_minibatches = j), one update per mini-batch.

        Returns the final state and one metrics dict (device scalars, not synced) per update, in order.
        ``ref_params`` is needed when the loss has beta > 0 and the batch has no ref_logp; with LoRA it defaults
        to the base weights (the adapters off). ``recompute_old_logp`` replaces the sampler's old log-probs by the
        trainer's.
        """
        if num_iterations < 1 or num_minibatches < 1:
            raise ValueError(f"update.py: num_iterations ({num_iterations}) and num_minibatches "
                             f"({num_minibatches}) must be >= 1")
        # multi-host: ``batch`` holds this process's rows; the global batch is all processes' rows together
        is_global = isinstance(batch.tokens, jax.Array) and not batch.tokens.is_fully_addressable
        rows = batch.num_rows if is_global or self.mesh is None else batch.num_rows * jax.process_count()
        if rows % num_minibatches:
            raise ValueError(f"update.py: {rows} rows do not split into {num_minibatches} mini-batches")
        if self.mesh is not None:
            n_dev = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            if (rows // num_minibatches) % n_dev:
                raise ValueError(f"update.py: mini-batches of {rows // num_minibatches} rows do not "
                                 f"divide over data x fsdp = {n_dev} devices")
        batch = self.shard_batch(batch)
        frozen = self._frozen()
        if ref_params is None and self.lora is not None and self.loss_cfg.beta > 0:
            ref_params = frozen  # the reference policy for free: the same base weights with the adapters off
        if batch.ref_logp is None and (self.loss_cfg.beta > 0 or ref_params is not None):
            if ref_params is None:
                raise ValueError(f"update.py: loss beta={self.loss_cfg.beta} > 0 needs ref_params or batch.ref_logp")
            batch = batch._replace(ref_logp=self.compute_logps(ref_params, batch))
        if recompute_old_logp or (batch.old_logp is None and (num_iterations > 1 or num_minibatches > 1)):
            batch = batch._replace(old_logp=self.compute_logps(state.params, batch, frozen))
        minibatches = (
            [batch] if num_minibatches == 1
            else [jax.tree.map(lambda x, j=j: x[j], self._split(batch, num_minibatches))
                  for j in range(num_minibatches)]
        )
        history = []
        for it in range(num_iterations):
            for mb in minibatches:
                with self.mesh_context():
                    state, metrics = self._step(state, mb, frozen)
                if it > 0:
                    metrics = {k: v for k, v in metrics.items() if not k.startswith(SAMPLER_DIFF)}
                history.append(metrics)
        return state, history

    def train_on_rollout(
        self, state: TrainState, batch: RolloutBatch, *, num_iterations: int = 1, num_minibatches: int = 1,
        ref_params: Params | None = None, recompute_old_logp: bool = False,
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """``run_updates``, with the per-update metrics combined by ``aggregate_metrics``."""
        state, history = self.run_updates(state, batch, num_iterations=num_iterations,
                                          num_minibatches=num_minibatches, ref_params=ref_params,
                                          recompute_old_logp=recompute_old_logp)
        return state, aggregate_metrics(history)


def aggregate_metrics(history: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """One dict for several updates (device scalars, no host sync): keys ending in "max" / "min" take the
    max / min, ``skipped`` the sum (the number of skipped updates), every other key the mean over the
    updates that report it (the sampler-vs-trainer difference: over the first iteration). Adds
    ``num_updates``."""
    if not history:
        raise ValueError("update.py: aggregate_metrics needs at least one update's metrics")
    out: dict[str, jax.Array] = {}
    for key in dict.fromkeys(k for m in history for k in m):
        values = jnp.stack([m[key] for m in history if key in m])
        if key.endswith("max"):
            out[key] = jnp.max(values)
        elif key.endswith("min"):
            out[key] = jnp.min(values)
        elif key == "skipped":
            out[key] = jnp.sum(values)
        else:
            out[key] = jnp.mean(values)
    out["num_updates"] = jnp.asarray(len(history), jnp.float32)
    return out


@functools.partial(jax.jit, static_argnums=1)
def reference_copy(params: Any, dtype: Any) -> Any:
    """A copy of the weights in ``dtype`` (its own buffers: the train state's are donated by each update),
    e.g. the frozen reference policy of the KL term."""
    return jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), params)

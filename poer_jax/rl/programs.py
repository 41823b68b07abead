"""The update step's compiled programs, described abstractly for the plan command (``poer_jax.plan``).

``trainer_program_specs`` returns, for a ``Trainer`` on its mesh and a rollout of ``rows`` x ``seq_len``:

  train/logprobs  ``Trainer.compute_logps`` over the whole rollout (old log-probs, or the reference
                  policy's for the KL term), run in the update's micro-batches;
  train/update    ``Trainer.update_step`` on one mini-batch (rows / num_minibatches), with old and
                  reference log-probs as inputs: forward + backward of every micro-batch, gradient
                  accumulation, AdamW on the float32 master weights and moments.

With LoRA (``trainer.lora``) the train state is the adapters and their moments, and the frozen base weights (compute
dtype) are a resident argument of both programs: the log-prob pass runs the policy (adapters on the base) or the
reference (the base alone), the update differentiates the adapters only.

Arguments are ``jax.ShapeDtypeStruct`` with the trainer's shardings; nothing is allocated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from poer_jax.model.qwen import param_shapes
from poer_jax.model.sharding import batch_sharding, param_shardings, replicated
from poer_jax.program_spec import (
    RESIDENT_BASE_PARAMS,
    RESIDENT_REF_PARAMS,
    RESIDENT_TRAIN_STATE,
    ROLLOUT_BUFFERS,
    ProgramSpec,
)
from poer_jax.rl.batch import RolloutBatch
from poer_jax.rl.update import Trainer, TrainState


def _sds(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def abstract_params(trainer: Trainer, dtype: Any) -> Any:
    """The model's parameter tree as abstract arrays of ``dtype``, sharded like the trained weights."""
    cfg = trainer.model_cfg
    return jax.tree.map(lambda s, sh: _sds(s, dtype, sh), param_shapes(cfg), param_shardings(cfg, trainer.mesh),
                        is_leaf=lambda x: isinstance(x, tuple))


def abstract_train_state(trainer: Trainer) -> TrainState:
    """TrainState(float32-or-param_dtype weights or LoRA adapters, optimizer state, step) with the trainer's
    shardings."""
    if trainer.state_shardings is None:
        raise ValueError("programs.py: the plan needs a Trainer built with a mesh")
    params = jax.tree.map(lambda x, sh: _sds(x.shape, x.dtype, sh),
                          trainer.abstract_trainable(trainer.model_cfg.jnp_param_dtype),
                          trainer.state_shardings.params)
    opt = jax.eval_shape(trainer.tx.init, params)
    opt = jax.tree.map(lambda x, sh: _sds(x.shape, x.dtype, sh), opt, trainer.state_shardings.opt_state)
    return TrainState(params, opt, _sds((), jnp.int32, replicated(trainer.mesh)))


def abstract_batch(trainer: Trainer, rows: int, seq_len: int, *, old: bool, ref: bool) -> RolloutBatch:
    mesh = trainer.mesh

    def arr(dtype: Any, ndim: int = 2) -> jax.ShapeDtypeStruct:
        return _sds((rows, seq_len)[:ndim], dtype, batch_sharding(mesh, ndim))

    return RolloutBatch(arr(jnp.int32), arr(jnp.bool_), arr(jnp.bool_), arr(jnp.float32, 1),
                        arr(jnp.float32) if old else None, arr(jnp.float32) if ref else None)


def trainer_program_specs(trainer: Trainer, *, rows: int, seq_len: int, num_minibatches: int = 1,
                          with_ref: bool, num_lengths: int = 1) -> list[ProgramSpec]:
    """[train/logprobs, train/update] (module docstring). ``with_ref``: the loss has a KL term (beta > 0), so
    reference weights (in the compute dtype) are resident and the log-prob pass runs on them.
    ``num_lengths``: how many padded lengths the run compiles (the length ladder's size)."""
    mb_rows = rows // num_minibatches
    state = abstract_train_state(trainer)
    k = trainer.update_cfg.micro_batches
    sizing = ("data.questions_per_step", "rollout.group_size", "optim.num_minibatches", "optim.micro_batches",
              "data.max_prompt_len", "rollout.max_completion_len", "model.remat", "model.attention")
    base = None if trainer.lora is None else abstract_params(trainer, trainer.model_cfg.jnp_dtype)
    if base is not None:  # LoRA: the reference is the base alone; old log-probs are the adapters' on the base
        lp_args, lp_resident = (((base, None), {RESIDENT_BASE_PARAMS: 0}) if with_ref else
                                ((state.params, base), {RESIDENT_TRAIN_STATE: 0, RESIDENT_BASE_PARAMS: 2}))
        step_args, step_resident = (base,), {RESIDENT_TRAIN_STATE: 0, RESIDENT_BASE_PARAMS: 2}
        sizing = (*sizing, "lora.rank", "lora.targets")
    elif with_ref:
        lp_args, lp_resident = (abstract_params(trainer, trainer.model_cfg.jnp_dtype),), {RESIDENT_REF_PARAMS: 0}
        step_args, step_resident = (), {RESIDENT_TRAIN_STATE: 0}
    else:
        lp_args, lp_resident = (state.params,), {RESIDENT_TRAIN_STATE: 0}
        step_args, step_resident = (), {RESIDENT_TRAIN_STATE: 0}
    # with a KL term the pass runs on the reference weights, and on the policy's when old log-probs are needed
    lp_batch = abstract_batch(trainer, rows, seq_len, old=False, ref=False)
    logprobs = ProgramSpec(
        name="train/logprobs", fn=trainer._logps,
        args=(lp_args[0], lp_batch, *lp_args[1:]),
        sizing_keys=sizing, num_shapes=num_lengths * (2 if with_ref else 1),
        note=f"{rows} rows x T={seq_len} in {k} micro-batches of {rows // k}",
        resident=lp_resident,
        released=ROLLOUT_BUFFERS,
        dims={"rows": rows, "seq_len": seq_len},
    )
    update = ProgramSpec(
        name="train/update", fn=trainer._step,
        args=(state, abstract_batch(trainer, mb_rows, seq_len, old=True, ref=with_ref), *step_args),
        sizing_keys=sizing, num_shapes=num_lengths,
        note=f"{mb_rows} rows x T={seq_len} in {k} micro-batches of {mb_rows // k}",
        resident=step_resident,
        released=ROLLOUT_BUFFERS,
        dims={"rows": mb_rows, "seq_len": seq_len},
    )
    return [logprobs, update]

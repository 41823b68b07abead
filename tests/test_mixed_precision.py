"""fp32 master weights + fp32 Adam moments with bf16 matmuls train at the paper's learning rate; bf16 weights do not.

200 updates at lr 1e-6 from the same (bf16-representable) start: the mixed-precision run (param_dtype float32,
dtype bfloat16) moves the weights as the all-float32 reference does, while the all-bfloat16 run rounds every
update away (Adam moves a weight by ~lr per step, far below bfloat16's spacing of ~1.2e-4 at 0.02).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poer_jax.model import init_params, preset
from poer_jax.rl.batch import build_rollout_batch
from poer_jax.rl.losses import LossConfig
from poer_jax.rl.optim import OptimConfig
from poer_jax.rl.update import Trainer, update_step
from poer_jax.system.config import ConfigError, default_config, validate

STEPS, LR = 200, 1e-6


def _moved(param_dtype: str, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of the flattened matrices after STEPS updates on one fixed batch."""
    cfg = preset("tiny", param_dtype=param_dtype, dtype=dtype)
    start = init_params(preset("tiny"), jax.random.key(0))
    start = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(param_dtype), start)  # same start in every run
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 500, 6).tolist() for _ in range(4)]
    conts = [rng.integers(1, 500, 10).tolist() for _ in range(4)]
    batch = build_rollout_batch(prompts, None, conts, [1.0, -1.0, 0.5, -0.5], pad_id=0, bucket=16)
    optim = OptimConfig(learning_rate=LR, total_steps=STEPS, min_lr_ratio=1.0, max_grad_norm=None)
    trainer = Trainer(cfg, LossConfig(), optim, compute_entropy=False)
    state = trainer.create_train_state(start)
    step = functools.partial(update_step, tx=trainer.tx, schedule=trainer.schedule, model_cfg=cfg,
                             loss_cfg=trainer.loss_cfg, update_cfg=trainer.update_cfg)
    batch = jax.tree.map(jnp.asarray, batch)
    state = jax.jit(lambda s: jax.lax.fori_loop(0, STEPS, lambda _, s: step(s, batch)[0], s))(state)
    assert int(state.step) == STEPS
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim >= 2]
    assert moments and all(x.dtype == jnp.dtype(param_dtype) for x in moments)  # Adam's moments follow the weights

    def flat(p):
        return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(p) if x.ndim >= 2])

    return flat(start), flat(state.params)


@pytest.fixture(scope="module")
def runs() -> dict[str, np.ndarray]:
    out = {}
    for name, (p, d) in {"fp32": ("float32", "float32"), "mixed": ("float32", "bfloat16"),
                         "bf16": ("bfloat16", "bfloat16")}.items():
        start, end = _moved(p, d)
        out[name] = end - start
    return out


def test_fp32_master_weights_move_like_the_fp32_reference(runs) -> None:
    ref, mixed = runs["fp32"], runs["mixed"]
    assert np.linalg.norm(ref) > 0.5 * STEPS * LR * np.sqrt(ref.size)  # the reference really trains (~lr a step)
    cos = ref @ mixed / (np.linalg.norm(ref) * np.linalg.norm(mixed))
    assert cos > 0.95, cos
    assert 0.9 < np.linalg.norm(mixed) / np.linalg.norm(ref) < 1.1
    trained = ref != 0  # weights with a gradient (not the embeddings of tokens absent from the batch)
    assert np.mean(trained) > 0.5 and np.mean(mixed[trained] != 0) > 0.99


def test_bf16_weights_do_not_move(runs) -> None:
    ref, bf16 = runs["fp32"], runs["bf16"]
    trained = ref != 0
    assert np.mean(bf16[trained] != 0) < 0.05  # rounded away: only weights within ~1e-4 of 0 can move
    assert np.linalg.norm(bf16) < 0.25 * np.linalg.norm(ref)  # the few that moved jumped a whole bf16 step


def test_config_rejects_bf16_master_weights_at_a_small_learning_rate() -> None:
    c = default_config()
    c.model.preset, c.data.train_path = "tiny", "x.jsonl"
    c.model.param_dtype, c.optim.learning_rate = "bfloat16", 1e-6
    with pytest.raises(ConfigError, match="model.param_dtype"):
        validate(c)
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    validate(c)


def test_reference_copy_in_the_compute_dtype_gives_the_same_logprobs() -> None:
    from poer_jax.rl.logprobs import token_logprobs
    from poer_jax.rl.update import reference_copy

    cfg = preset("tiny", param_dtype="float32", dtype="bfloat16")
    params = init_params(cfg, jax.random.key(3))
    ref = reference_copy(params, jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(ref))
    tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, cfg.vocab_size)
    mask = jnp.ones((2, 16), bool)
    lp = jax.jit(lambda p: token_logprobs(p, cfg, tokens, mask)[0])
    np.testing.assert_array_equal(lp(params), lp(ref))  # every weight is cast to bf16 before use anyway

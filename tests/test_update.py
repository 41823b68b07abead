"""Policy update: rollout batch layout, optimizer config, exact accumulation, direction of one step,
sharded == unsharded, non-finite skip, mu > 1, the sampler-vs-trainer metric."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poer_jax.model import QwenConfig, make_mesh, param_shapes, param_shardings
from poer_jax.rl.batch import RolloutBatch, bucket_length, build_rollout_batch, shard_batch
from poer_jax.rl.losses import LossConfig
from poer_jax.rl.optim import OptimConfig, decay_mask, make_optimizer
from poer_jax.rl.update import (
    SAMPLER_DIFF,
    Trainer,
    UpdateConfig,
    aggregate_metrics,
    create_train_state,
    loss_and_grads,
)

CFG = QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=8)
B = 16
OPT = OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=100, min_lr_ratio=1.0, max_grad_norm=1.0)
UPD = UpdateConfig(micro_batches=2, temperature=0.7, chunk_size=5)
LOSS = LossConfig()


def _rows(seed: int = 0, n: int = B):
    rng = np.random.RandomState(seed)
    prompts = [list(rng.randint(1, 64, rng.randint(1, 5))) for _ in range(n)]
    prefixes = [list(rng.randint(1, 64, rng.randint(0, 4))) for _ in range(n)]
    conts = [list(rng.randint(1, 64, rng.randint(1, 7))) for _ in range(n)]
    adv = np.where(np.arange(n) % 2 == 0, 1.0, -1.0) * rng.uniform(0.5, 1.5, n)
    return prompts, prefixes, conts, adv.astype(np.float32)


@functools.cache
def _params():
    """Random weights built in numpy (no compile); shared and never donated (create_train_state copies)."""
    rng = np.random.RandomState(0)

    def leaf(path, shape):
        name = path[-1].key
        if name.endswith("norm"):
            return jnp.ones(shape, jnp.float32)
        if name.endswith("bias"):
            return jnp.asarray(rng.normal(0, 0.02, shape), jnp.float32)
        return jnp.asarray(rng.normal(0, 0.2, shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple))


def _np(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


# ---- rollout batch layout -----------------------------------------------------------------------------


def test_batch_layout_and_prefix_in_loss():
    prompts, prefixes, conts = [[5, 6], [7]], [[8, 9, 10], []], [[11, 12], [13, 14, 15]]
    sampler = [[-0.5, -0.25], [-1.0, -2.0, -3.0]]
    b = build_rollout_batch(prompts, prefixes, conts, [1.0, -1.0], sampler, pad_id=0, bucket=4)
    assert b.tokens.shape == (2, 8) and b.tokens.dtype == np.int32
    np.testing.assert_array_equal(b.tokens, [[5, 6, 8, 9, 10, 11, 12, 0], [7, 13, 14, 15, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b.attention_mask, [[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    # paper (default): only the continuation is trained; the prefix is prompt
    np.testing.assert_array_equal(b.loss_mask, [[0, 0, 0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b.old_logp, [[0, 0, 0, 0, 0, -0.5, -0.25, 0], [0, -1, -2, -3, 0, 0, 0, 0]])
    assert b.ref_logp is None and b.advantages.dtype == np.float32
    # authors' code: prefix tokens trained too; the sampler has no log-probs for them -> trainer computes
    c = build_rollout_batch(prompts, prefixes, conts, [1.0, -1.0], sampler, pad_id=0, bucket=4, prefix_in_loss=True)
    np.testing.assert_array_equal(c.loss_mask, [[0, 0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(c.tokens, b.tokens)
    assert c.old_logp is None
    # no prefix at all: prefix_in_loss changes nothing and the sampler log-probs are kept
    d = build_rollout_batch(prompts, None, conts, [1.0, -1.0], sampler, pad_id=0, bucket=4, prefix_in_loss=True)
    assert d.old_logp is not None and d.loss_mask[0, 2:4].all()


def test_batch_bucketing_and_errors():
    assert [bucket_length(n, 8) for n in (0, 1, 8, 9)] == [8, 8, 8, 16]
    b = build_rollout_batch([[1] * 5], None, [[2] * 6], [0.0], pad_id=3, bucket=16)
    assert b.tokens.shape == (1, 16) and (b.tokens[0, 11:] == 3).all()
    with pytest.raises(ValueError, match=r"old_logps\[1\]"):
        build_rollout_batch([[1], [1]], None, [[2], [2, 3]], [0.0, 0.0], [[-1.0], [-1.0]], pad_id=0)
    with pytest.raises(ValueError, match=r"prompt_ids\[0\] is empty"):
        build_rollout_batch([[]], None, [[2]], [0.0], pad_id=0)
    with pytest.raises(ValueError, match="advantages"):
        build_rollout_batch([[1]], None, [[2]], [0.0, 1.0], pad_id=0)
    with pytest.raises(ValueError, match="continuation_ids has 1 rows"):
        build_rollout_batch([[1], [1]], None, [[2]], [0.0, 1.0], pad_id=0)
    with pytest.raises(ValueError, match=r"old_logps\[0\] has a non-finite"):
        build_rollout_batch([[1]], None, [[2]], [0.0], [[float("nan")]], pad_id=0)
    with pytest.raises(ValueError, match="divide over data x fsdp"):
        shard_batch(b, make_mesh((1, 2, 1), jax.devices()[:2]))


# ---- optimizer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("learning_rate", -1e-6), ("learning_rate", float("nan")), ("b1", 1.0), ("b2", -0.1), ("eps", 0.0),
    ("weight_decay", -1.0), ("max_grad_norm", 0.0), ("warmup_steps", -1), ("warmup_steps", 2000),
    ("total_steps", 0), ("total_steps", 1.5), ("min_lr_ratio", 1.5),
])
def test_optim_config_validation(field, value):
    with pytest.raises(ValueError, match=f"OptimConfig.{field}"):
        OptimConfig(**{field: value})


def test_schedule_is_warmup_then_cosine_to_min():
    cfg = OptimConfig.from_warmup_ratio(0.1, 100, learning_rate=2e-6, min_lr_ratio=0.1)
    assert cfg.warmup_steps == 10
    _, sched = make_optimizer(cfg)

    def hf(s):  # Hugging Face cosine_with_min_lr
        if s < 10:
            return 2e-6 * s / 10
        p = min((s - 10) / 90, 1.0)
        return 2e-7 + (2e-6 - 2e-7) * 0.5 * (1 + math.cos(math.pi * p))

    for s in (0, 5, 10, 40, 99, 100, 150):
        assert float(sched(s)) == pytest.approx(hf(s), rel=1e-5, abs=1e-12)


def test_weight_decay_skips_norms_and_biases():
    mask = decay_mask(_params())
    assert mask["embed"] and mask["layers"]["q_proj"] and mask["lm_head"]
    assert not mask["final_norm"] and not mask["layers"]["input_norm"] and not mask["layers"]["q_bias"]


# ---- shared fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer():
    return Trainer(CFG, LOSS, OPT, UPD)


@pytest.fixture(scope="module")
def batch(trainer):
    """A rollout whose old_logp the trainer computed (so the sampler-vs-trainer metric must be ~0)."""
    prompts, prefixes, conts, adv = _rows()
    b = build_rollout_batch(prompts, prefixes, conts, adv, pad_id=0, bucket=8)
    b = b._replace(old_logp=np.asarray(trainer.compute_logps(_params(), b)))
    assert np.all(b.old_logp[b.loss_mask] < 0) and np.all(b.old_logp[~b.loss_mask] == 0)
    return b


@pytest.fixture(scope="module")
def one_step(trainer, batch):
    """(state after one update on ``batch`` from _params(), metrics), unsharded, on jax.devices()[0]."""
    state = trainer.create_train_state(_params())
    state, metrics = trainer.update_step(state, batch)
    return _np(state), _np(metrics)


def _assert_same_state(state, ref):
    """Same Adam moments and step; same parameters up to 2 % of one step (Adam's first update is about
    lr * sign(g), so elements with g ~ 0 turn rounding differences into visible, harmless ones)."""
    np.testing.assert_array_equal(state.step, ref.step)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state.opt_state), jax.tree.leaves(ref.opt_state),
                            strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=str(path))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(ref.params),
                            strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=0.02 * OPT.learning_rate, err_msg=str(path))


def _row_logp(trainer, params, batch):
    return np.asarray(trainer.compute_logps(params, batch)).sum(axis=1)


# ---- the update ---------------------------------------------------------------------------------------


def test_one_step_moves_logp_with_the_advantage(trainer, batch, one_step):
    """must-show 6a: positive-advantage rows become more likely, negative ones less likely."""
    state, metrics = one_step
    before = _row_logp(trainer, _params(), batch)
    after = _row_logp(trainer, state.params, batch)
    assert metrics["skipped"] == 0 and int(state.step) == 1
    assert np.all(np.sign(after - before) == np.sign(batch.advantages)), (after - before, batch.advantages)
    assert metrics["lr"] == pytest.approx(1e-3) and metrics["grad_norm"] > 0
    assert metrics["num_tokens"] == batch.loss_mask.sum()
    assert metrics["ratio/mean"] == pytest.approx(1.0, abs=1e-5)
    assert abs(metrics[SAMPLER_DIFF]) < 1e-5  # old_logp computed by the trainer
    assert 0 < metrics["entropy"] < math.log(CFG.vocab_size) / 0.7 + 1e-3


@pytest.mark.parametrize("mesh_shape,micro_batches", [((2, 2, 2), 2), ((1, 8, 1), 1)])
def test_sharded_step_equals_unsharded(batch, one_step, mesh_shape, micro_batches):
    """must-show 6b: the same step on 8 CPU devices gives the same parameters and metrics as on one device
    (``one_step``, 2 micro-batches). The (1, 8, 1) case runs with 1 micro-batch, so it is also must-show 3
    through the jitted update step (one compile fewer than a separate check)."""
    mesh = make_mesh(mesh_shape)
    tr = Trainer(CFG, LOSS, OPT, dataclasses.replace(UPD, micro_batches=micro_batches), mesh=mesh)
    state = tr.create_train_state(_params())
    mu = state.opt_state[1][0].mu
    assert jax.tree.map(lambda x: x.sharding, mu) == param_shardings(CFG, mesh)  # moments follow params
    state, metrics = tr.update_step(state, batch)
    assert jax.tree.map(lambda x: x.sharding, state.params) == param_shardings(CFG, mesh)
    _assert_same_state(_np(state), one_step[0])
    ref_metrics = one_step[1]
    metrics = _np(metrics)
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_create_train_state_follows_param_shardings():
    mesh = make_mesh((2, 2, 2))
    params = jax.device_put(_params(), param_shardings(CFG, mesh))
    state = create_train_state(params, OPT)
    assert jax.tree.map(lambda x: x.sharding, state.opt_state[1][0].nu) == param_shardings(CFG, mesh)
    assert state.opt_state[1][0].count.sharding.is_fully_replicated
    # the state owns its buffers: deleting them (as donation does) leaves the caller's params alive
    jax.tree.map(lambda x: x.delete(), state.params)
    assert np.isfinite(np.asarray(params["embed"])).all()


AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "dr_grpo")


@pytest.fixture(scope="module")
def accumulated(batch):
    """loss_and_grads for k = 1 and k = 4 and every aggregation, in one jit (one compile instead of six).

    Off-policy old / ref log-probs so that clipping and the KL term are active; row 3 has no trained
    token (its seq-mean term must not count in any micro-batch)."""
    rng = np.random.RandomState(1)
    lm = batch.loss_mask.copy()
    lm[3] = False
    b = batch._replace(
        loss_mask=lm,
        old_logp=np.where(lm, batch.old_logp + rng.normal(0, 0.3, lm.shape), 0).astype(np.float32),
        ref_logp=np.where(lm, batch.old_logp + rng.normal(0, 0.3, lm.shape), 0).astype(np.float32),
    )

    def run(params, bb):
        out = {}
        for agg in AGGREGATIONS:
            cfg = LossConfig(aggregation=agg, max_completion_len=8, beta=0.04, epsilon_high=0.28)
            for k in (1, 4):
                upd = UpdateConfig(micro_batches=k, temperature=0.7, chunk_size=5)
                out[agg, k] = loss_and_grads(params, bb, CFG, cfg, upd)
        return out

    return _np(jax.jit(run)(_params(), jax.tree.map(jnp.asarray, b)))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batch_accumulation_is_exact(accumulated, aggregation):
    """must-show 3: k micro-batches give the loss and gradient of the full batch (any aggregation)."""
    (l1, g1, m1), (l4, g4, m4) = accumulated[aggregation, 1], accumulated[aggregation, 4]
    assert m1["clip_ratio/region_mean"] > 0 and m1["kl"] > 0
    np.testing.assert_allclose(l4, l1, rtol=1e-5, atol=1e-6)
    for (path, a), c in zip(jax.tree_util.tree_leaves_with_path(g4), jax.tree.leaves(g1), strict=True):
        assert np.abs(c).max() > 0, path
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6 * np.abs(c).max(), err_msg=str(path))
    for key in m1:
        np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_aggregations_differ(accumulated):
    """The three aggregations are really different losses (the check above is not vacuous)."""
    losses = [float(accumulated[a, 1][0]) for a in AGGREGATIONS]
    assert len({round(x, 6) for x in losses}) == 3, losses


def test_non_finite_loss_skips_the_update(trainer, batch):
    state = trainer.create_train_state(_params())
    before = _np(state)
    bad = batch._replace(advantages=np.where(np.arange(B) == 5, np.nan, batch.advantages).astype(np.float32))
    state, metrics = trainer.update_step(state, bad)
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    after = _np(state)
    assert int(after.step) == 0
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
    # the state is still usable and the next good step applies
    state, metrics = trainer.update_step(state, batch)
    assert float(metrics["skipped"]) == 0.0 and int(state.step) == 1
    assert not np.array_equal(np.asarray(state.params["embed"]), before.params["embed"])


def test_mu_two_iterations_go_off_policy(trainer, batch):
    """mu = 2 over a rollout without stored log-probs: the trainer computes old_logp once, iteration 1 is
    on-policy (ratio 1, mismatch ~0), iteration 2 sees ratios != 1; the mismatch metric is first-iteration only."""
    state = trainer.create_train_state(_params())
    state, hist = trainer.run_updates(state, batch._replace(old_logp=None), num_iterations=2)
    assert len(hist) == 2 and int(state.step) == 2
    first, second = _np(hist[0]), _np(hist[1])
    assert first["ratio/max"] == pytest.approx(1.0, abs=1e-5) and first["ratio/min"] == pytest.approx(1.0, abs=1e-5)
    assert abs(first[SAMPLER_DIFF]) < 1e-5
    assert max(second["ratio/max"] - 1, 1 - second["ratio/min"]) > 1e-3
    assert SAMPLER_DIFF not in second
    # the same through train_on_rollout: one aggregated dict (same compiled step)
    state, agg = trainer.train_on_rollout(trainer.create_train_state(_params()), batch._replace(old_logp=None),
                                          num_iterations=2)
    agg = _np(agg)
    assert agg["num_updates"] == 2 and agg["skipped"] == 0 and int(state.step) == 2
    assert agg["ratio/max"] == pytest.approx(second["ratio/max"], rel=1e-5)
    assert agg["loss"] == pytest.approx((first["loss"] + second["loss"]) / 2, rel=1e-4, abs=1e-7)
    assert abs(agg[SAMPLER_DIFF]) < 1e-5


def test_aggregate_metrics():
    hist = [{"loss": jnp.float32(1.0), "ratio/max": jnp.float32(1.5), "ratio/min": jnp.float32(0.9),
             "skipped": jnp.float32(1.0), SAMPLER_DIFF: jnp.float32(0.2)},
            {"loss": jnp.float32(3.0), "ratio/max": jnp.float32(1.2), "ratio/min": jnp.float32(0.7),
             "skipped": jnp.float32(1.0)}]
    agg = _np(aggregate_metrics(hist))
    assert agg == {"loss": 2.0, "ratio/max": 1.5, "ratio/min": np.float32(0.7), "skipped": 2.0,
                   SAMPLER_DIFF: np.float32(0.2), "num_updates": 2.0}
    with pytest.raises(ValueError, match="at least one"):
        aggregate_metrics([])


def test_sampler_vs_trainer_metric_measures_the_mismatch(trainer, batch):
    rng = np.random.RandomState(2)
    delta = rng.uniform(-0.2, 0.2, batch.old_logp.shape).astype(np.float32)
    sampler = batch._replace(old_logp=np.where(batch.loss_mask, batch.old_logp + delta, 0).astype(np.float32))
    _, metrics = trainer.update_step(trainer.create_train_state(_params()), sampler)
    expected = np.abs(delta[batch.loss_mask]).mean()
    assert float(metrics[SAMPLER_DIFF]) == pytest.approx(expected, rel=1e-3)
    assert float(metrics[SAMPLER_DIFF + "_max"]) == pytest.approx(np.abs(delta[batch.loss_mask]).max(), rel=1e-3)


def test_kl_reference_and_minibatches(batch):
    """beta > 0 needs a reference; against itself the KL is 0. Two mini-batches: two updates, mini-batch j
    = rows b with b mod 2 = j, each counting its own trained tokens."""
    tr = Trainer(CFG, LossConfig(beta=0.04), OPT, UPD)
    with pytest.raises(ValueError, match="needs ref_params"):
        tr.train_on_rollout(tr.create_train_state(_params()), batch)
    state = tr.create_train_state(_params())
    with pytest.raises(ValueError, match="mini-batches"):
        tr.train_on_rollout(state, batch, num_minibatches=3, ref_params=_params())
    state, hist = tr.run_updates(state, batch, num_minibatches=2, ref_params=_params())
    assert int(state.step) == 2 and len(hist) == 2
    first, second = _np(hist[0]), _np(hist[1])
    assert abs(first["kl"]) < 1e-6 and second["kl"] > 1e-7 and first["skipped"] == second["skipped"] == 0
    counts = [float(h["num_tokens"]) for h in (first, second)]
    assert counts == [batch.loss_mask[j::2].sum() for j in range(2)]
    assert isinstance(hist[0]["loss"], jax.Array)


def test_trainer_arguments():
    with pytest.raises(TypeError, match="loss_cfg must be a LossConfig"):
        Trainer(CFG, OPT, LOSS)
    with pytest.raises(TypeError, match="micro_batchez"):
        Trainer(CFG, LOSS, OPT, micro_batchez=2)
    tr = Trainer(CFG, LOSS, OPT, UPD, micro_batches=4, chunk_size=3)
    assert tr.update_cfg == UpdateConfig(micro_batches=4, temperature=0.7, chunk_size=3)
    state = create_train_state(_params(), tr)
    assert int(state.step) == 0 and state.opt_state[1][0].mu["embed"].shape == (CFG.vocab_size, CFG.hidden_size)
    with pytest.raises(TypeError, match="OptimConfig or a Trainer"):
        create_train_state(_params(), LOSS)


def test_bad_splits(batch):
    with pytest.raises(ValueError, match="micro_batches"):
        UpdateConfig(micro_batches=0)
    half = RolloutBatch(*[None if x is None else x[:6] for x in batch])
    with pytest.raises(ValueError, match="micro_batches=4"):
        loss_and_grads(_params(), jax.tree.map(jnp.asarray, half), CFG, LOSS, UpdateConfig(micro_batches=4))
    tr = Trainer(CFG, LOSS, OPT, UPD, mesh=make_mesh((1, 8, 1)))
    with pytest.raises(ValueError, match="divide over data x fsdp = 8"):
        tr.train_on_rollout(tr.create_train_state(_params()), batch, num_minibatches=4)

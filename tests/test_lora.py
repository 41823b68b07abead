"""LoRA adapters: their math against numpy, the base model's logits at B = 0 bit for bit, gradients that reach the
adapters only (and equal the chain rule through the full model's), the KL reference as the base with the adapters
off and no copy of it, shardings on 8 devices, the sampler's merged weights against the unmerged forward, the
PEFT round trip through transformers + peft, and the config keys. (Whole runs: tests/test_lora_run.py.)"""

from __future__ import annotations

import functools
import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from poer_jax.model import QwenConfig, forward_logits, init_params, make_mesh
from poer_jax.model.adapters import adapter_shapes, adapter_shardings, attach, init_adapters, merge
from poer_jax.model.lora import LoraConfig, LoraWeight, init_a, lora_delta, merged_weight
from poer_jax.rl.batch import build_rollout_batch
from poer_jax.rl.losses import LossConfig
from poer_jax.rl.optim import OptimConfig
from poer_jax.rl.update import Trainer, loss_and_grads

CFG = QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8)
LORA = LoraConfig(rank=4, alpha=8.0)
OPT = OptimConfig(learning_rate=1e-2, warmup_steps=0, total_steps=100, min_lr_ratio=1.0, max_grad_norm=1.0)


@functools.cache
def _base() -> dict:
    return init_params(CFG, jax.random.key(0), std=0.3)


def _trained(adapters: dict, seed: int = 5, std: float = 0.3) -> dict:
    """Adapters as after some training: B no longer zero."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree.map(lambda x: x + std * jax.random.normal(next(keys), x.shape, x.dtype), adapters)


# jitted, so that the weights are arguments: an eager scan would keep the arrays it closes over as constants
_grads = jax.jit(loss_and_grads, static_argnums=(2, 3, 4), static_argnames=("lora",))


def _batch(n: int = 8, seed: int = 0):
    rng = np.random.RandomState(seed)
    prompts = [list(rng.randint(1, 64, rng.randint(2, 6))) for _ in range(n)]
    conts = [list(rng.randint(1, 64, rng.randint(2, 8))) for _ in range(n)]
    adv = (np.where(np.arange(n) % 2 == 0, 1.0, -1.0) * rng.uniform(0.5, 1.5, n)).astype(np.float32)
    return build_rollout_batch(prompts, [[] for _ in range(n)], conts, adv, pad_id=0, bucket=8)


# ---- the math ----------------------------------------------------------------------------------------------------


def test_lora_products_merge_and_init_against_numpy() -> None:
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(3, 5, 16)).astype(np.float32), rng.normal(size=(16, 24)).astype(np.float32)
    a, b = rng.normal(size=(16, 4)).astype(np.float32), rng.normal(size=(4, 24)).astype(np.float32)
    lw = LoraWeight(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), None, scale=2.0)
    np.testing.assert_allclose(lora_delta(jnp.asarray(x), lw, jnp.float32), 2.0 * (x @ a) @ b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merged_weight(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), 2.0), w + 2.0 * a @ b,
                               rtol=1e-6, atol=1e-6)
    # dropout on the adapter's input only: kept inputs scaled by 1 / (1 - p), the mask from the weight's key
    key = jax.random.key(3)
    drop = LoraWeight(lw.base, lw.a, lw.b, jax.random.key_data(key), scale=2.0, dropout=0.25)
    keep = np.asarray(jax.random.bernoulli(key, 0.75, (15, 16)))
    want = 2.0 * ((np.where(keep, x.reshape(15, 16) / 0.75, 0) @ a) @ b).reshape(3, 5, 24)
    np.testing.assert_allclose(lora_delta(jnp.asarray(x), drop, jnp.float32), want, rtol=1e-5, atol=1e-5)
    assert 0.15 < 1 - keep.mean() < 0.35
    # A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's Kaiming-uniform, a = sqrt(5)): bound and variance 1 / (3 in)
    big = np.asarray(init_a(jax.random.key(1), (2, 256, 64), jnp.float32))
    assert np.abs(big).max() <= 1 / 16 and np.abs(big).max() > 0.99 / 16
    np.testing.assert_allclose(big.var(), 1 / (3 * 256), rtol=0.03)
    ad = init_adapters(CFG, LORA, jax.random.key(2))
    assert all(not np.any(np.asarray(p["b"])) for p in ad["layers"].values())
    assert jax.tree.map(lambda x: x.shape, ad) == adapter_shapes(CFG, LORA)
    assert adapter_shapes(CFG, LORA)["layers"]["down_proj"] == {"a": (2, 64, 4), "b": (2, 4, 32)}


@pytest.mark.parametrize("dtype,remat", [("float32", False), ("bfloat16", True)])
def test_zero_b_gives_the_base_models_logits_bit_for_bit(dtype: str, remat: bool) -> None:
    cfg = CFG.replace(dtype=dtype, remat=remat)
    base = jax.tree.map(lambda x: x.astype(cfg.jnp_dtype), _base())
    tokens = jax.random.randint(jax.random.key(1), (3, 11), 0, 64)
    logits = jax.jit(forward_logits, static_argnums=1)
    adapters = init_adapters(cfg, LORA, jax.random.key(2))
    plain, adapted = logits(base, cfg, tokens), logits(attach(base, adapters, LORA), cfg, tokens)
    assert np.asarray(plain).tobytes() == np.asarray(adapted).tobytes()
    # and the adapters do act once B moves
    assert not np.allclose(logits(attach(base, _trained(adapters), LORA), cfg, tokens), plain, atol=1e-2)


def test_gradients_reach_the_adapters_only_and_follow_the_chain_rule() -> None:
    """dL/dB = (alpha / r) A^T dL/dW and dL/dA = (alpha / r) dL/dW B^T (= 0 at B = 0), with dL/dW the full
    model's gradient at the same weights; the base is untouched, not copied, and only the adapters are state."""
    base, batch = _base(), _batch()
    trainer = Trainer(CFG, LossConfig(), OPT, lora=LORA, micro_batches=2)
    state = trainer.create_train_state(base)
    assert trainer.base_params is base  # already in the compute dtype: taken as it is, no copy
    adapters = jax.device_get(state.params)
    assert jax.tree.map(np.shape, adapters) == adapter_shapes(CFG, LORA)
    assert {x.shape for x in jax.tree.leaves(state.opt_state)} <= {x.shape for x in jax.tree.leaves(adapters)} | {()}
    jb = jax.tree.map(jnp.asarray, batch)
    _, g_full, _ = _grads(base, jb, CFG, LossConfig(), trainer.update_cfg)
    _, g_lora, _ = _grads(state.params, jb, CFG, LossConfig(), trainer.update_cfg, frozen=base, lora=LORA)
    assert jax.tree.structure(g_lora) == jax.tree.structure(adapters)
    s = LORA.scale
    for name, g in g_lora["layers"].items():
        gw, a = np.asarray(g_full["layers"][name]), adapters["layers"][name]["a"]
        np.testing.assert_allclose(g["b"], s * np.einsum("lir,lio->lro", a, gw), rtol=1e-4, atol=1e-6, err_msg=name)
        assert not np.any(np.asarray(g["a"])), name  # B = 0
    # one update: the adapters move, the base does not; the chain rule again at B != 0 (dL/dA now nonzero)
    before = jax.device_get(base)
    state, metrics = trainer.update_step(state, batch)
    assert float(metrics["grad_norm"]) > 0 and float(metrics["skipped"]) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.base_params), before)
    moved = jax.device_get(state.params)
    assert all(np.any(p["b"]) for p in moved["layers"].values())
    _, g_full, _ = _grads(merge(base, moved, LORA), jb, CFG, LossConfig(), trainer.update_cfg)
    _, g_lora, _ = _grads(moved, jb, CFG, LossConfig(), trainer.update_cfg, frozen=base, lora=LORA)
    for name, g in g_lora["layers"].items():
        gw, b = np.asarray(g_full["layers"][name]), moved["layers"][name]["b"]
        np.testing.assert_allclose(g["a"], s * np.einsum("lio,lro->lir", gw, b), rtol=2e-3, atol=2e-6, err_msg=name)


def test_dropout_masks_differ_per_step_and_leave_log_prob_passes_alone() -> None:
    base, batch = _base(), _batch()
    jb = jax.tree.map(jnp.asarray, batch)
    drop = LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    trained = _trained(init_adapters(CFG, drop, jax.random.key(2)))
    upd = Trainer(CFG, LossConfig(), OPT, lora=drop).update_cfg

    def grads(key):
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(
            _grads(trained, jb, CFG, LossConfig(), upd, frozen=base, lora=drop, key=key)[1])])

    plain = grads(None)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(grads(k1), grads(k1))  # a step's masks are a function of its key
    assert not np.allclose(grads(k1), grads(k2)) and not np.allclose(grads(k1), plain)
    no_drop = Trainer(CFG, LossConfig(), OPT, lora=LORA)
    with_drop = Trainer(CFG, LossConfig(), OPT, lora=drop)
    for t in (no_drop, with_drop):
        t.create_train_state(base)
    np.testing.assert_array_equal(with_drop.compute_logps(trained, batch, base), no_drop.compute_logps(trained, batch,
                                                                                                         base))


def _copies_of(x: jax.Array) -> set[int]:
    """Ids of the live arrays other than ``x`` that hold ``x``'s values."""
    gc.collect()
    return {id(y) for y in jax.live_arrays() if y is not x and y.shape == x.shape and y.dtype == x.dtype
            and np.array_equal(y, x)}


def test_the_kl_reference_is_the_base_with_the_adapters_off_and_no_copy() -> None:
    base, batch = _base(), _batch()
    q = base["layers"]["q_proj"]
    copies_before = _copies_of(q)  # (jax.device_get in other tests leaves host-backed copies alive)
    trainer = Trainer(CFG, LossConfig(beta=0.1), OPT, lora=LORA)
    state = trainer.create_train_state(base)
    calls = []
    logps = trainer._logps

    def spy(params, b, frozen=None):
        calls.append((params, frozen))
        return logps(params, b, frozen)

    trainer._logps = spy
    state, history = trainer.run_updates(state, batch, num_iterations=2)  # no ref_params: the trainer's base
    assert calls[0][0] is trainer.base_params and calls[0][1] is None  # reference: the base alone, no adapters
    assert calls[1][1] is trainer.base_params  # old log-probs (mu = 2): the adapters on the same base
    # at B = 0 the policy is the reference exactly: KL 0 on the first update, then the adapters move away
    assert abs(float(history[0]["kl"])) < 1e-7 and float(history[1]["kl"]) > 1e-6
    ref = np.asarray(trainer.compute_logps(base, batch))
    np.testing.assert_array_equal(ref, np.asarray(Trainer(CFG, LossConfig(), OPT).compute_logps(base, batch)))
    # no reference copy: with the trainer and its state alive, no new array holds the base's values
    assert _copies_of(q) <= copies_before


# ---- sharding on 8 devices ------------------------------------------------------------------------------------


def test_adapters_shard_like_their_weights_and_the_update_matches_one_device() -> None:
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    sh = adapter_shardings(CFG, LORA, mesh)["layers"]
    assert (sh["q_proj"]["a"].spec, sh["q_proj"]["b"].spec) == (P(None, "fsdp", None), P(None, None, "tensor"))
    assert (sh["o_proj"]["a"].spec, sh["o_proj"]["b"].spec) == (P(None, "tensor", None), P(None, None, "fsdp"))
    assert (sh["down_proj"]["a"].spec, sh["down_proj"]["b"].spec) == (P(None, "tensor", None), P(None, None, "fsdp"))
    base, batch = _base(), _batch()
    one = Trainer(CFG, LossConfig(), OPT, lora=LORA, micro_batches=2)
    eight = Trainer(CFG, LossConfig(), OPT, lora=LORA, micro_batches=2, mesh=mesh)
    s1, s8 = one.create_train_state(base), eight.create_train_state(base)
    for x, want in zip(jax.tree.leaves(s8.params), jax.tree.leaves(adapter_shardings(CFG, LORA, mesh)), strict=True):
        assert x.sharding.is_equivalent_to(want, x.ndim)
    mu = s8.opt_state[1][0].mu["layers"]["q_proj"]["b"]  # Adam's moments follow their adapters
    assert mu.sharding.is_equivalent_to(sh["q_proj"]["b"], 3)
    assert eight.base_params["layers"]["q_proj"].sharding.spec == P(None, "fsdp", "tensor")  # frozen base, FSDP
    for _ in range(2):
        s1, m1 = one.update_step(s1, batch)
        s8, m8 = eight.update_step(s8, batch)
        np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), jax.device_get(s8.params),
                 jax.device_get(s1.params))


# ---- the sampler decodes with the merged weights --------------------------------------------------------------


def _unmerged_greedy(model: dict, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], np.ndarray]:
    """Greedy continuations by full recompute with the unmerged (attached) model, and each token's log-prob."""
    logits = jax.jit(forward_logits, static_argnums=1)
    out, lps = [], []
    for p in prompts:
        seq, lp = list(p), []
        for _ in range(steps):
            z = np.asarray(logits(model, CFG, jnp.asarray([seq])))[0, -1]
            t = int(z.argmax())
            lp.append(z[t] - np.log(np.exp(z - z.max()).sum()) - z.max())
            seq.append(t)
        out.append(seq[len(p):])
        lps.append(lp)
    return out, np.asarray(lps)


@pytest.mark.parametrize("kernel", ["xla", "packed_cpu"])
def test_merged_sampler_equals_the_unmerged_forward(kernel: str) -> None:
    """The sampler's weights come from the run's reshard with the merge in it (``ProcessLocalParams``: one program
    per update, on an FSDP mesh); its tokens and log-probs are those of the unmerged model; a new update's
    adapters reach it through ``update_params``."""
    from poer_jax.sampler import GroupSampler, SamplerConfig, SamplingParams
    from poer_jax.sampler.packed_weights import packed_matmul_reason
    from poer_jax.system.multihost import ProcessLocalParams

    mesh = make_mesh({"fsdp": 2}, jax.devices()[:2])
    if kernel == "packed_cpu" and packed_matmul_reason(CFG, mesh, True):
        pytest.skip(packed_matmul_reason(CFG, mesh, True))
    base = _base()
    trainer = Trainer(CFG, LossConfig(), OPT, lora=LORA, mesh=mesh)
    state = trainer.create_train_state(base)
    local = ProcessLocalParams(mesh, CFG, frozen=trainer.base_params, combine=functools.partial(merge, lora=LORA))
    scfg = SamplerConfig(page_size=4, num_pages=64, pad_id=0, sampling=SamplingParams(temperature=0.0),
                         matmul_kernel=kernel, layer_loop="unrolled")
    prompts = [[3, 9, 27, 17], [5, 1], [8, 60, 2, 33, 7]]
    for seed in (5, 6):
        adapters = jax.device_put(_trained(jax.device_get(state.params), seed=seed), trainer.state_shardings.params)
        if seed == 5:
            sampler = GroupSampler(local(adapters), CFG, scfg, mesh=local.mesh)
        else:
            sampler.update_params(local(adapters))
        res = sampler.generate(prompts, 2, 6, jax.random.key(0))
        want, want_lp = _unmerged_greedy(attach(base, jax.device_get(adapters), LORA), prompts, 6)
        for r in range(len(prompts) * 2):
            assert res.tokens[r].tolist() == want[r // 2], (seed, r)
        np.testing.assert_allclose(res.policy_logprobs, np.repeat(want_lp, 2, axis=0), atol=1e-4)
    assert want != _unmerged_greedy(base, prompts, 6)[0]  # the adapters change the answers


# ---- PEFT ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", [("q", "k", "v", "o", "gate", "up", "down"), ("q", "v", "down")])
def test_peft_round_trip_through_transformers_and_peft(hf_qwen2_dir, tmp_path, targets) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from poer_jax.model import load_hf
    from poer_jax.model.peft_io import export_peft, load_peft

    lora = LoraConfig(rank=4, alpha=12.0, targets=targets, dropout=0.05)
    base, cfg = load_hf(hf_qwen2_dir)
    adapters = jax.device_get(_trained(init_adapters(cfg, lora, jax.random.key(4)), std=0.05))
    out = export_peft(adapters, lora, tmp_path / "adapter", base_model=str(hf_qwen2_dir))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9))
    ours = np.asarray(forward_logits(attach(base, adapters, lora), cfg, jnp.asarray(tokens)))
    hf = AutoModelForCausalLM.from_pretrained(hf_qwen2_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, out).eval()
    names = set(model.state_dict())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in names
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not np.allclose(ours, np.asarray(forward_logits(base, cfg, jnp.asarray(tokens))), atol=1e-3)
    back, back_cfg = load_peft(out, cfg)
    assert (back_cfg.rank, back_cfg.alpha, back_cfg.targets, back_cfg.dropout) == (4, 12.0, targets, 0.05)
    jax.tree.map(np.testing.assert_array_equal, back, adapters)


# ---- the config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    ("lora.rank=-1", "'lora.rank' must be >= 0"),
    ("lora.targets=q,x", "'lora.targets' must name products among q, k, v, o, gate, up, down"),
    ("lora.targets=q,q", "'lora.targets' names a product twice"),
    ("lora.dropout=1.0", "'lora.dropout' must be < 1"),
    ("lora.alpha=0", "'lora.alpha' must be > 0 with lora.rank=8"),
])
def test_lora_keys_are_validated_by_name(override: str, message: str) -> None:
    from poer_jax.system.config import ConfigError, apply_overrides, default_config, validate

    base = ["model.preset=tiny", "data.train_path=x.jsonl", "lora.rank=8"]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(apply_overrides(default_config(), [*base, override]))
    cfg = validate(apply_overrides(default_config(), base))
    from poer_jax.system.update import build_lora_config

    assert build_lora_config(cfg) == LoraConfig(rank=8, alpha=16.0)
    assert build_lora_config(validate(apply_overrides(default_config(), [*base, "lora.rank=0"]))) is None

"""Qwen port: parity with transformers, export round trip, sharding, presets, bad input."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from poer_jax.model import (
    PRESET_PARAM_COUNTS,
    ModelConfigError,
    QwenConfig,
    WeightFileError,
    export_hf,
    forward_logits,
    init_params,
    load_hf,
    make_mesh,
    positions_from_mask,
    preset,
)
from tests.hf_fixtures import VOCAB

LENGTHS = [12, 7, 3, 10]


def _batch(side: str, T: int = 12, seed: int = 0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(2, VOCAB, (len(LENGTHS), T))
    mask = np.zeros(tokens.shape, bool)
    for b, n in enumerate(LENGTHS):
        if side == "right":
            mask[b, :n] = True
        else:
            mask[b, T - n:] = True
    tokens = np.where(mask, tokens, 0)
    return tokens, mask


def _hf_logits(model_dir, tokens, mask, dtype="float32"):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        out = m(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))).logits
    return out.float().numpy()


def _ours(params, cfg, tokens, mask):
    m = jnp.asarray(mask)
    return np.asarray(forward_logits(params, cfg, jnp.asarray(tokens), positions_from_mask(m), m))


CKPTS = ["hf_qwen2_dir", "hf_qwen2_tied_dir", "hf_qwen3_dir"]


@pytest.mark.parametrize("ckpt", CKPTS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_fp32_logits_match_transformers(ckpt, side, request):
    d = request.getfixturevalue(ckpt)
    params, cfg = load_hf(d)
    tokens, mask = _batch(side)
    diff = np.abs(_ours(params, cfg, tokens, mask) - _hf_logits(d, tokens, mask))[mask]
    assert diff.max() <= 1e-4, diff.max()


@pytest.mark.parametrize("ckpt", CKPTS)
def test_bf16_top1_agreement(ckpt, request):
    d = request.getfixturevalue(ckpt)
    params, cfg = load_hf(d, param_dtype="bfloat16", dtype="bfloat16")
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    agree = []
    for seed in range(8):
        tokens, mask = _batch(("left", "right")[seed % 2], seed=seed)
        ref = _hf_logits(d, tokens, mask)
        ours = _ours(params, cfg, tokens, mask)
        agree.append((ours.argmax(-1) == ref.argmax(-1))[mask])
    assert np.concatenate(agree).mean() >= 0.99


@pytest.mark.parametrize("ckpt", CKPTS)
def test_export_round_trip(ckpt, request, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    d = request.getfixturevalue(ckpt)
    params, cfg = load_hf(d)
    out = export_hf(params, cfg, tmp_path / "export", tokenizer_dir=d)
    a = AutoModelForCausalLM.from_pretrained(d).eval()
    b = AutoModelForCausalLM.from_pretrained(out).eval()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    tokens, mask = _batch("left")
    np.testing.assert_array_equal(_hf_logits(d, tokens, mask), _hf_logits(out, tokens, mask))


def test_export_sharded_files_and_bf16(hf_qwen2_dir, tmp_path):
    params, cfg = load_hf(hf_qwen2_dir)
    out = export_hf(params, cfg, tmp_path / "sharded", dtype="bfloat16", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back, cfg2 = load_hf(out)
    assert cfg2.param_dtype == "float32"  # loading dtype is ours to choose
    ref = jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)), params)
    jax.tree.map(np.testing.assert_array_equal, ref, jax.tree.map(np.asarray, back))


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 8, 1)])
@pytest.mark.parametrize("ckpt", ["hf_qwen2_dir", "hf_qwen3_dir"])
def test_sharded_forward_equals_single_device(ckpt, mesh_shape, request):
    assert len(jax.devices()) == 8
    d = request.getfixturevalue(ckpt)
    params, cfg = load_hf(d)
    tokens, mask = _batch("left", T=12)
    single = _ours(params, cfg, tokens, mask)
    mesh = make_mesh(mesh_shape)
    sparams, _ = load_hf(d, mesh=mesh)
    sharded = _ours(sparams, cfg, tokens, mask)
    np.testing.assert_allclose(sharded, single, atol=2e-5)
    # the intended shardings: q_proj over fsdp x tensor; kv heads (2) on a tensor axis of 2 shard too
    q = sparams["layers"]["q_proj"]
    assert q.sharding.spec == P(None, "fsdp" if mesh.shape["fsdp"] > 1 else None,
                                "tensor" if mesh.shape["tensor"] > 1 else None)
    assert q.sharding.mesh.shape == mesh.shape
    assert len(q.addressable_shards) == 8


def test_kv_heads_that_do_not_divide_tensor_axis_are_replicated(hf_qwen2_dir):
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})  # 2 KV heads, 4 query heads
    params, cfg = load_hf(hf_qwen2_dir, mesh=mesh)
    assert params["layers"]["k_proj"].sharding.spec == P(None, "fsdp", None)
    assert params["layers"]["q_proj"].sharding.spec == P(None, "fsdp", "tensor")
    tokens, mask = _batch("right")
    ref, _ = load_hf(hf_qwen2_dir)
    np.testing.assert_allclose(_ours(params, cfg, tokens, mask), _ours(ref, cfg, tokens, mask), atol=2e-5)


def test_mesh_config():
    assert make_mesh({"data": 2, "fsdp": -1}).shape == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh((3, 2, 1))
    with pytest.raises(ValueError, match="unknown axis"):
        make_mesh({"model": 8})


@pytest.mark.parametrize("name", sorted(PRESET_PARAM_COUNTS))
def test_preset_param_counts(name):
    cfg = preset(name)
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == PRESET_PARAM_COUNTS[name]


def test_remat_and_scan_give_same_logits(hf_qwen3_dir):
    params, cfg = load_hf(hf_qwen3_dir)
    tokens, mask = _batch("right")
    np.testing.assert_allclose(_ours(params, cfg.replace(remat=True), tokens, mask), _ours(params, cfg, tokens, mask),
                               atol=1e-6)


def test_transformers4_style_config_is_read(hf_qwen2_dir):
    hf = json.loads((hf_qwen2_dir / "config.json").read_text())
    hf.pop("rope_parameters", None)
    hf["rope_theta"] = 12345.0
    assert QwenConfig.from_hf_dict(hf).rope_theta == 12345.0
    hf5 = dict(hf, rope_parameters={"rope_type": "default", "rope_theta": 777.0})
    hf5.pop("rope_theta")
    assert QwenConfig.from_hf_dict(hf5).rope_theta == 777.0


# ---- bad input -------------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(ModelConfigError, match="no config.json"):
        load_hf(tmp_path / "nope")


def test_unsupported_architecture(hf_qwen2_dir, tmp_path):
    d = tmp_path / "llama"
    shutil.copytree(hf_qwen2_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match=r"config\.json.*'llama'.*not supported"):
        load_hf(d)


def _rewrite_weights(src, dst, edit):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_tensor_names_file_and_tensor(hf_qwen2_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    d = _rewrite_weights(hf_qwen2_dir, tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(WeightFileError, match=rf"model\.safetensors: missing tensor '{name}'"):
        load_hf(d)


def test_wrong_shape_names_file_and_tensor(hf_qwen2_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"

    def edit(t):
        t[name] = t[name][:-1]

    d = _rewrite_weights(hf_qwen2_dir, tmp_path / "m", edit)
    with pytest.raises(WeightFileError, match=rf"model\.safetensors: tensor '{name}' has shape \(31, 64\)"):
        load_hf(d)


def test_no_weight_files(hf_qwen2_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(hf_qwen2_dir, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(WeightFileError, match="no model.safetensors"):
        load_hf(d)


def test_corrupt_weight_file(hf_qwen2_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(hf_qwen2_dir, d)
    (d / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(WeightFileError, match="not a readable safetensors file"):
        load_hf(d)


def test_nnx_module_matches_functional_and_trains(hf_qwen2_dir, tmp_path):
    from flax import nnx

    from poer_jax.model import QwenForCausalLM

    model = QwenForCausalLM.from_pretrained(hf_qwen2_dir)
    params, cfg = load_hf(hf_qwen2_dir)
    tokens, mask = _batch("left")
    m = jnp.asarray(mask)
    logits = nnx.jit(lambda mod, t: mod(t, positions_from_mask(m), m))(model, jnp.asarray(tokens))
    # two programs (nnx.jit and jit) whose float sums may round apart: ~1e-6 relative on logits of ~10
    np.testing.assert_allclose(np.asarray(logits), _ours(params, cfg, tokens, mask), rtol=1e-5, atol=1e-5)
    grads = nnx.grad(lambda mod: mod(jnp.asarray(tokens)).mean())(model)
    assert jax.tree.leaves(grads)[0].shape == jax.tree.leaves(nnx.state(model, nnx.Param))[0].shape
    out = model.save_pretrained(tmp_path / "nnx_export")
    back, _ = load_hf(out)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, back), jax.tree.map(np.asarray, params))
    with pytest.raises(ValueError, match="rngs"):
        QwenForCausalLM(cfg)
    assert QwenForCausalLM(cfg, rngs=nnx.Rngs(0)).params["embed"].shape == (cfg.vocab_size, cfg.hidden_size)


def test_truncated_weight_file_is_named(hf_qwen2_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(hf_qwen2_dir, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match=r"model\.safetensors: truncated: its header describes \d+ bytes"):
        load_hf(d)


def test_architectures_must_match_model_type(hf_qwen2_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(hf_qwen2_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match=r"config\.json: model_type='qwen2' but architectures="
                                               r"\['MistralForCausalLM'\]; a qwen2 checkpoint is Qwen2ForCausalLM"):
        load_hf(d)


def test_nonfinite_weights_are_named_at_load(hf_qwen2_dir, tmp_path):
    name = "model.layers.1.self_attn.v_proj.weight"

    def edit(t):
        t[name] = t[name].copy()
        t[name][3, 5] = np.inf

    d = _rewrite_weights(hf_qwen2_dir, tmp_path / "m", edit)
    with pytest.raises(WeightFileError, match=rf"non-finite weights \(NaN or inf\) in '{name}' \(.*safetensors\)"):
        load_hf(d)
    params, _ = load_hf(d, check_finite=False)  # for inspection
    assert not np.isfinite(np.asarray(params["layers"]["v_proj"])).all()

"""Per-call FLOPs and bytes of compiled programs (``plan/costs.py``): loop bodies times their trip counts (nested,
annotated or read from the loop condition), data-dependent loops counted once, custom-call kernels by formula,
fused gathers and scatters counted as XLA counts them unfused; and the per-step pricing next to the analytic
projection (``plan/step_cost.py``), which must agree within 15 % on a small preset."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from poer_jax.plan import costs, hlo
from poer_jax.plan.costs import call_cost

ROOT = Path(__file__).resolve().parents[1]
W = jax.ShapeDtypeStruct((28, 256, 256), jnp.float32)
X = jax.ShapeDtypeStruct((8, 256), jnp.float32)


def _layers(w: jax.Array, x: jax.Array) -> jax.Array:
    return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0]


def _compiled(fn, *args, **kw):
    return jax.jit(fn, **kw).lower(*args).compile()


def test_a_scan_counts_every_layer() -> None:
    """XLA's own analysis counts the scan body once; per call it is 28 layers, as the unrolled program's."""
    scanned = _compiled(_layers, W, X)
    unrolled = _compiled(lambda w, x: [x := jnp.tanh(x @ w[i]) for i in range(28)][-1], W, X)
    cost = call_cost(scanned.as_text())
    dot = 2 * 8 * 256 * 256
    assert cost.xla_flops < 2 * dot  # one body
    assert cost.flops == pytest.approx(28 * dot, rel=0.02)
    assert cost.flops == pytest.approx(unrolled.cost_analysis()["flops"], rel=0.02)
    (loop,) = cost.loops
    assert loop.trip == 28 and loop.source == "known_trip_count"
    # bytes: every layer's weights are read once (28 x 256 KB), not one layer's
    assert cost.bytes_accessed > 28 * 256 * 256 * 4 > cost.xla_bytes_accessed


def test_nested_loops_multiply_and_a_data_dependent_loop_counts_once() -> None:
    def micro_batches(w, x):  # 3 micro-batches of the 28-layer scan, then a while loop of unknown length
        y = jax.lax.fori_loop(0, 3, lambda i, h: _layers(w, h), x)
        return jax.lax.while_loop(lambda c: c[1].sum() < 1e9, lambda c: (c[0] @ w[0], c[1] + c[0]), (y, y))[1]

    cost = call_cost(_compiled(micro_batches, W, X).as_text())
    dot = 2 * 8 * 256 * 256
    trips = sorted((lp.trip or 0) for lp in cost.loops)
    assert trips == [0, 3, 28]
    (open_loop,) = cost.data_dependent_loops
    assert open_loop.flops_per_iteration == pytest.approx(dot, rel=0.05)
    assert cost.flops == pytest.approx(3 * 28 * dot + dot, rel=0.03)


def test_a_capped_data_dependent_loop_counts_its_cap() -> None:
    """fori_loop(0, minimum(n, 5)): n is data, the cap is the worst case (the decode attention's chunk loop)."""
    def capped(w, x, n):
        return jax.lax.fori_loop(0, jnp.minimum(n, 5), lambda i, h: jnp.tanh(h @ w[i]), x)

    n = jax.ShapeDtypeStruct((), jnp.int32)
    cost = call_cost(_compiled(capped, W, X, n).as_text())
    (loop,) = cost.loops
    assert (loop.trip, loop.source) == (5, "bound")
    assert cost.flops == pytest.approx(5 * 2 * 8 * 256 * 256, rel=0.05)

    def nested(w, x, n):  # the cap computed once, carried unchanged through an enclosing loop (the layer scan)
        cap = jnp.minimum(n, 5)
        return jax.lax.fori_loop(0, 3, lambda j, h: jax.lax.fori_loop(0, cap, lambda i, g: jnp.tanh(g @ w[i]), h), x)

    cost = call_cost(_compiled(nested, W, X, n).as_text())
    assert sorted((lp.trip, lp.source) for lp in cost.loops) == [(3, "known_trip_count"), (5, "bound")]
    assert cost.flops == pytest.approx(15 * 2 * 8 * 256 * 256, rel=0.05)


def test_trip_count_from_the_loop_condition() -> None:
    """TPU modules carry no trip-count annotation: the condition i < N with i starting at a constant gives it."""
    text = _compiled(_layers, W, X).as_text()
    stripped = hlo.TRIP.sub('"no_trip_count":{"n":"0"', text)
    cost = call_cost(stripped)
    assert [(lp.trip, lp.source) for lp in cost.loops] == [(28, "condition")]
    assert cost.flops == pytest.approx(call_cost(text).flops)


def test_fused_gathers_and_scatters_count_what_they_move() -> None:
    pool = jax.ShapeDtypeStruct((100_000, 128), jnp.float32)
    idx = jax.ShapeDtypeStruct((10,), jnp.int32)
    rows = 10 * 128 * 4
    gather = call_cost(_compiled(lambda p, i: (p[i] * 2).sum(0), pool, idx).as_text())
    assert gather.xla_bytes_accessed > 100_000 * 128 * 4  # XLA: the whole pool
    assert rows < gather.bytes_accessed < 2 * rows
    upd = jax.ShapeDtypeStruct((10, 128), jnp.float32)
    scatter = call_cost(_compiled(lambda p, i, u: p.at[i].set(u * 2), pool, idx, upd, donate_argnums=0).as_text())
    assert scatter.xla_bytes_accessed > 2 * 100_000 * 128 * 4
    assert scatter.bytes_accessed < 6 * rows
    # XLA:TPU wraps a gather in a custom fusion, which XLA already costs as the gather: nothing to correct
    text = _compiled(lambda p, i: (p[i] * 2).sum(0), pool, idx).as_text().replace("kind=kLoop", "kind=kCustom")
    custom = call_cost(text)
    assert custom.bytes_accessed == custom.xla_bytes_accessed < 4 * rows


def test_custom_calls_are_priced_by_formula() -> None:
    """The packed CPU matmul (an FFI custom call XLA counts as nothing) as 2 M K N, the cuDNN and paged-attention
    formulas on their HLO lines."""
    from poer_jax.model.packed_matmul import kernel_error, pack, packed_matmul

    if kernel_error():
        pytest.skip(kernel_error())
    w = jnp.ones((256, 96), jnp.float32)
    compiled = jax.jit(lambda x, pw: packed_matmul(x, pw)).lower(jnp.ones((8, 256)), pack(w)).compile()
    cost = call_cost(compiled.as_text())
    assert dict(cost.kernels) == {"packed cpu matmul": 1}
    assert cost.flops == pytest.approx(2 * 8 * 256 * 96, rel=0.05)
    comp = hlo.Comp("c", [], {}, None, False)
    fmha = hlo.parse_instr(
        '%a = (bf16[2,2,256,128]{3,1,2,0}, f32[2,2,256]{2,1,0}, u8[0]{0}) custom-call(%q, %k, %v, %l, %l), '
        'custom_call_target="__cudnn$fmhaSoftmax", operand_layout_constraints={bf16[2,256,2,128]{3,2,1,0}, '
        'bf16[2,256,1,128]{3,2,1,0}, bf16[2,256,1,128]{3,2,1,0}, s32[2]{0}, s32[2]{0}}, backend_config={'
        '"cudnn_fmha_backend_config": {"intermediate_tensor_shape": {"dimensions": ["2", "2", "256", "256"]}, '
        '"mask_type": "PADDING_CAUSAL"}}')
    kind, flops, _ = costs.price_custom_call(fmha, comp)
    assert kind == "cudnn attention" and flops == 4 * 2 * 2 * 256 * 256 * 128 / 2
    paged = hlo.parse_instr(
        '%p = (f32[4,16,1,16,128]{4,3,2,1,0}, f32[4,16,1,16]{3,2,1,0}, f32[4,16,1,16]{3,2,1,0}) custom-call(%q, '
        '%k, %v, %t, %n), custom_call_target="__gpu$xla.gpu.triton", operand_layout_constraints={'
        'bf16[4,1,16,128]{3,2,1,0}, bf16[1,272,16,128]{3,2,1,0}, bf16[1,272,16,128]{3,2,1,0}, s32[4,16,1]{2,1,0}, '
        's32[4,1]{1,0}}, backend_config={name = "poer_paged_attention", grid_x = 1 : i32}')
    kind, flops, nbytes = costs.price_custom_call(paged, comp)
    # 4 (row, head) instances x 16 pages of 16 tokens, 16 query rows of 128 each: 2 matmuls
    assert kind == "paged attention (triton)" and flops == 4 * 16 * 128 * 16 * (4 * 16)
    assert nbytes < 2 * 272 * 16 * 128 * 2  # the pages of the tables, not both whole pools
    # splash's fused backward: its largest result is per-block partial dq (9 blocks), the queries are an operand
    dkv = hlo.parse_instr(
        '%splash_mha_dkv_segmented_no_residuals.12 = (f32[4,512,128]{2,1,0}, bf16[4,9,12,4608,128]{4,3,2,1,0}, '
        'bf16[4,2,4608,128]{3,2,1,0}, bf16[4,2,4608,128]{3,2,1,0}) custom-call(%m, %n, %q, %k, %v), '
        'custom_call_target="tpu_custom_call", operand_layout_constraints={s8[1,9,9]{2,1,0}, s8[1,9,9]{2,1,0}, '
        'bf16[4,12,4608,128]{3,2,1,0}, bf16[4,2,4608,128]{3,2,1,0}, bf16[4,2,4608,128]{3,2,1,0}}')
    kind, flops, _ = costs.price_custom_call(dkv, comp)
    assert kind == "splash attention backward" and flops == 2.5 * 4 * (4 * 12 * 4608 * 128) * 4608 / 2


def test_compiled_step_prices_agree_with_the_projection(monkeypatch) -> None:
    """A GRPO and a POER step priced from the four compiled programs and the step's call counts against
    ``plan/projection.py``'s analytic figure for the same tokens, on a small model whose update is compute-bound and
    whose decode reads mostly weights on the host-CPU chip (the regime the projection's formulas describe)."""
    from poer_jax.model import presets
    from poer_jax.plan import get_target
    from poer_jax.plan.build import plan_config
    from poer_jax.system.config import apply_overrides, load_config_file, validate

    monkeypatch.setitem(presets._PRESETS, "test-small", dict(
        vocab_size=2048, hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=128, rope_theta=1e4, tie_word_embeddings=False))
    cfg = validate(apply_overrides(load_config_file(ROOT / "configs/arithmetic.py"), [
        "model.preset=test-small", "model.path=None", "data.train_path=unused.jsonl", "toy.enabled=false",
        "mesh.fsdp=-1", "data.questions_per_step=8", "rollout.group_size=4", "data.max_prompt_len=64",
        "rollout.max_completion_len=192", "model.dtype=float32", "optim.micro_batches=2", "loss.beta=0.04",
        "cache.max_truncation=32"]))
    report = plan_config(cfg, get_target("cpu-8"), num_questions=64)
    steps = {r["strategy"]: r for r in report.steps}
    assert set(steps) == {"GRPO", "POER"}
    grpo, poer = steps["GRPO"], steps["POER"]
    # 32 samples on 8 devices of 4 slots: one round; GRPO decodes 192 tokens a sample, POER m = L / 2 = 16
    assert grpo["calls"]["decode_steps"] == 192 and poer["calls"]["decode_steps"] == 16
    assert grpo["calls"]["logprobs"] == grpo["calls"]["update"] == 1.0  # the KL term's reference pass, one update
    for r in (grpo, poer):
        assert abs(r["ratio"] - 1) < 0.15, (r["strategy"], r["compiled_s"], r["analytic_s"])
    assert poer["compiled_s"]["rollout"] < 0.5 * grpo["compiled_s"]["rollout"]
    assert any(line.startswith("step: GRPO step:") for line in report.table().splitlines())

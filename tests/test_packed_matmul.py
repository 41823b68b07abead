"""The packed CPU product kernel (``model/packed_matmul``) and the sampler's packed weights
(``sampler/packed_weights``).

The kernel equals numpy's product over ragged shapes (rows not a multiple of its register tile, columns not a
multiple of a panel, leading axes) on every instruction-set path this CPU can run (``pm.isa_paths()``: on an
AVX-512 machine the AVX-512, AVX2 and baseline builds of the same source); a row's result does not depend on the
rows that come with it, bit for bit, on every path; the fused multiply-add paths agree bit for bit; packing
round-trips exactly; a build that cannot happen says why and leaves nothing in the cache. The sampler packs where
it applies (CPU, float32, layers unrolled, no tensor axis), refuses 'packed_cpu' elsewhere naming why, and its
samples equal XLA's products: greedy tokens, seeded samples, log-probs to float32 rounding, for Qwen2 (biases,
untied head) and Qwen3 (q/k norms, tied head).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poer_jax.model import packed_matmul as pm
from poer_jax.model.sharding import make_mesh
from poer_jax.sampler import GroupSampler, SamplerConfig, SamplerError, SamplingParams
from poer_jax.sampler import packed_weights as pw_mod
from tests.test_sampler import QWEN2, QWEN3, _params, _prompts

LENS = (1, 4, 5, 16, 17, 23, 9, 30)
BUDGETS = [6, 9, 3, 12, 7, 10, 2, 5]


PATHS = pm.isa_paths()


@pytest.fixture(scope="module")
def kernel() -> None:
    for isa in PATHS:  # the CI machine has a compiler: a failed build fails here, with the compiler's message
        pm.load_kernel(isa)


def test_every_instruction_set_path_of_this_architecture_is_tested() -> None:
    """On x86-64 with AVX2 + FMA (every CI machine) three builds run: native (AVX-512 where the CPU has it), AVX2
    and the SSE2 baseline; so a CPU family the suite never ran on meets no path the suite did not run."""
    flags = set(pm._cpu_signature().split())
    want = set(pm.ISA_FLAGS[pm._arch()]) - ({"avx2"} if not {"avx2", "fma"} <= flags else set())
    assert PATHS[0] == "native" and set(PATHS) == want and "baseline" in PATHS, PATHS


def _rand(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- the kernel ------------------------------------------------------------------------------------------
SHAPES = [(1, 7, 5), (3, 64, 33), (8, 96, 32), (9, 64, 130), (17, 33, 96), (33, 16, 64), (0, 8, 40), (4, 0, 40)]
# every shape on the sampler's path; the ragged ones and the empty ones on the others (whose tiles the row test
# below walks through one by one)
CASES = [("native", *shape) for shape in SHAPES] + [
    (isa, *shape) for isa in PATHS[1:] for shape in [(1, 7, 5), (9, 64, 130), (17, 33, 96), (0, 8, 40), (4, 0, 40)]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("isa,M,K,N", CASES)
def test_packed_matmul_equals_numpy(kernel, isa: str, M: int, K: int, N: int, dtype: str) -> None:
    """bfloat16 operands: their products are exact in float32, so the result is the float64 product of the
    bfloat16 values to float32 summation error, like float32's."""
    x, w = jnp.asarray(_rand((M, K), 0), dtype), jnp.asarray(_rand((K, N), 1), dtype)
    y = jax.jit(pm.packed_matmul, static_argnums=2)(x, jax.jit(pm.pack)(w), isa)
    assert y.shape == (M, N) and y.dtype == jnp.float32
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * max(K, 1) ** 0.5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_rows_result_does_not_depend_on_the_other_rows(kernel, dtype: str) -> None:
    """Bit for bit, on every path: the first m of 33 rows (every tile shape and remainder) and each row alone give
    the rows of the 33-row call, over 40 panels shared between threads. So a sampler's row gets the
    same products on 1 device as on 8, whichever rows share its tile. Where a fused multiply-add exists (AVX-512,
    AVX2 + FMA) the paths agree bit for bit too: the same chain of fma over k, in another register width."""
    x, w = jnp.asarray(_rand((33, 96), 6), dtype), jax.jit(pm.pack)(jnp.asarray(_rand((96, 1270), 7), dtype))
    full = {}
    for isa in PATHS:
        f = jax.jit(pm.packed_matmul, static_argnums=2)
        full[isa] = np.asarray(f(x, w, isa))
        for m in (*range(1, 10), 16, 17, 23, 32):  # every remainder of the 8-, 3- and 2-row tiles
            np.testing.assert_array_equal(np.asarray(f(x[:m], w, isa)), full[isa][:m], err_msg=f"{isa}: {m} rows")
        for i in (0, 7, 8, 16, 31, 32):
            np.testing.assert_array_equal(np.asarray(f(x[i:i + 1], w, isa))[0], full[isa][i], err_msg=f"{isa}: row {i}")
    fused = [isa for isa in PATHS if isa != "baseline"]
    if pm._arch() == "x86_64" and "fma" not in pm._cpu_signature().split():
        fused = []  # native on an x86 without FMA is the baseline's arithmetic
    for isa in fused[1:]:
        np.testing.assert_array_equal(full[isa], full[fused[0]], err_msg=f"{isa} vs {fused[0]}")


@pytest.mark.parametrize("isa", PATHS)
def test_packed_matmul_takes_leading_axes_and_many_panels(kernel, isa: str) -> None:
    """[2, 3, K] rows and a weight of 40 panels (split between XLA's threads where it has several)."""
    x, w = _rand((2, 3, 48), 2), _rand((48, 1270), 3)
    y = jax.jit(pm.packed_matmul, static_argnums=2)(jnp.asarray(x), pm.pack(jnp.asarray(w)), isa)
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)


def test_pack_layout_and_round_trip() -> None:
    w = _rand((5, 70), 4)
    p = pm.pack(jnp.asarray(w))
    assert p.data.shape == (3, 5, 32) and p.shape == (5, 70)
    data = np.asarray(p.data)
    for k, n in [(0, 0), (4, 31), (2, 32), (3, 69)]:
        assert data[n // 32, k, n % 32] == w[k, n]
    assert (data[2, :, 70 - 64:] == 0).all()  # padding columns are zeros
    np.testing.assert_array_equal(np.asarray(pm.unpack(p)), w)
    leaves, treedef = jax.tree.flatten(p)  # a pytree of one array; N is static
    assert len(leaves) == 1 and jax.tree.unflatten(treedef, leaves).n == 70


def test_packed_matmul_rejects_other_dtypes_and_shapes(kernel) -> None:
    p = pm.pack(jnp.ones((8, 40), jnp.float32))
    for x in (jnp.ones((2, 8), jnp.bfloat16), jnp.ones((2, 8), jnp.float16)):  # another dtype than the weight's
        with pytest.raises(TypeError, match="float32 or bfloat16 operands of one dtype"):
            pm.packed_matmul(x, p)
    with pytest.raises(ValueError, match="K=8"):
        pm.packed_matmul(jnp.ones((2, 9), jnp.float32), p)


def test_a_build_that_cannot_happen_says_why_and_leaves_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("POER_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert "no C++ compiler ('no-such-compiler-here'" in pm._load()
    monkeypatch.setenv("CXX", "c++")
    bad = tmp_path / "broken.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(pm, "SOURCE", bad)
    msg = pm._load()
    assert msg.startswith("packed_matmul: ") and "broken.cc" in msg and "failed" in msg
    assert list((tmp_path / "cache").iterdir()) == []  # no partial library, no temporary file
    monkeypatch.setattr(pm, "SOURCE", pm.SOURCE.__class__(pm.__file__).with_name("packed_matmul.cc"))
    assert "no 'avx9' path on" in pm._load("avx9")
    monkeypatch.setattr(pm, "_cpu_signature", lambda: "flags : fpu sse sse2")  # an x86-64 without AVX2
    if pm._arch() == "x86_64":
        assert "cannot run the 'avx2' path (it lacks avx2, fma)" in pm._load("avx2")


def test_the_build_is_cached_by_source_and_cpu(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("POER_JAX_KERNEL_CACHE", str(tmp_path))
    first = pm._build("c++")
    stamp = first.stat().st_mtime_ns
    assert pm._build("c++") == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    edited = tmp_path / "edited.cc"
    edited.write_text(pm.SOURCE.read_text() + "\n// edited\n")
    with monkeypatch.context() as m:
        m.setattr(pm, "SOURCE", edited)
        assert pm._library_path("c++") != first  # another source, another library
    assert pm._library_path("c++", "baseline") != first  # another path, another library
    monkeypatch.setattr(pm, "_cpu_signature", lambda: "flags : another CPU")
    assert pm._library_path("c++") != first  # -march=native: another CPU, another library


# ---- when the sampler packs -----------------------------------------------------------------------------
def test_the_sampler_packs_where_the_kernel_applies(kernel, monkeypatch) -> None:
    use = pw_mod.use_packed_matmuls
    scfg = SamplerConfig()
    assert use(scfg, QWEN2, None, unrolled=True)
    assert not use(SamplerConfig(matmul_kernel="xla"), QWEN2, None, unrolled=True)
    assert not use(scfg, QWEN2, None, unrolled=False)
    assert use(scfg, QWEN2.replace(dtype="bfloat16"), None, unrolled=True)
    assert not use(scfg, QWEN2.replace(dtype="float16"), None, unrolled=True)
    tp = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    assert not use(scfg, QWEN2, tp, unrolled=True)
    assert use(scfg, QWEN2, make_mesh({"data": 2, "fsdp": 4, "tensor": 1}, jax.devices()[:8]), unrolled=True)
    forced = SamplerConfig(matmul_kernel="packed_cpu")
    for cfg, mesh, unrolled, why in [(QWEN2.replace(dtype="float16"), None, True, "compute dtype float16"),
                                     (QWEN2, tp, True, "tensor parallelism"), (QWEN2, None, False, "layer_loop")]:
        with pytest.raises(SamplerError, match=f"matmul_kernel='packed_cpu' cannot be used: {why}"):
            use(forced, cfg, mesh, unrolled)
    monkeypatch.setattr(pw_mod, "kernel_error", lambda: "packed_matmul: no C++ compiler")
    with pytest.warns(UserWarning, match=r"XLA's dot on CPU .*no C\+\+ compiler"):
        assert not use(scfg, QWEN2, None, unrolled=True)  # auto falls back to XLA's dot, saying so
    with pytest.raises(SamplerError, match=r"no C\+\+ compiler"):
        use(forced, QWEN2, None, unrolled=True)
    with pytest.raises(SamplerError, match="matmul_kernel must be one of"):
        SamplerConfig(matmul_kernel="mkl")


# ---- the sampler's samples -----------------------------------------------------------------------------
def _generate(params, cfg, kernel_name: str, sp: SamplingParams, mesh=None):
    scfg = SamplerConfig(page_size=4, num_pages=256, max_slots=64, max_pages_per_seq=16, max_prefill_length=32,
                         eos_ids=(5,), sampling=sp, matmul_kernel=kernel_name)
    sampler = GroupSampler(params, cfg, scfg, mesh=mesh)
    assert sampler.packed_matmuls == (kernel_name == "packed_cpu")
    return sampler, sampler.generate(_prompts(LENS, cfg.vocab_size, seed=5), 3, BUDGETS, jax.random.key(7))


GREEDY, TOP_P = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.9)


@pytest.mark.parametrize("cfg_name,sp", [("qwen2", GREEDY), ("qwen2", TOP_P), ("qwen3", TOP_P), ("qwen2-bf16", GREEDY)])
def test_packed_samples_equal_xlas(kernel, cfg_name: str, sp: SamplingParams) -> None:
    cfg = {"qwen2": QWEN2, "qwen3": QWEN3, "qwen2-bf16": QWEN2.replace(dtype="bfloat16")}[cfg_name]
    params = _params(cfg)
    _, ref = _generate(params, cfg, "xla", sp)
    sampler, res = _generate(params, cfg, "packed_cpu", sp)
    np.testing.assert_array_equal(res.tokens, ref.tokens)
    np.testing.assert_array_equal(res.finish_reason, ref.finish_reason)
    np.testing.assert_allclose(res.logprobs, ref.logprobs, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(res.policy_logprobs, ref.policy_logprobs, rtol=1e-5, atol=2e-5)
    weights = sampler._weights
    assert isinstance(weights["lm_head"], pm.PackedWeight)  # the head too, tied or not
    assert all(isinstance(lp[k], pm.PackedWeight) for lp in weights["layers"] for k in pw_mod.PRODUCTS)
    assert not isinstance(weights["layers"][0]["input_norm"], pm.PackedWeight)


def test_packed_sampler_on_eight_devices_returns_the_weights_it_was_given(kernel) -> None:
    """Data-parallel over 8 devices (no tensor axis): every device holds the whole packed weights; samples equal
    one device's; ``params`` unpacks to the given weights exactly; one packing program across updates."""
    cfg = QWEN2
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1}, jax.devices()[:8])
    sp = SamplingParams(temperature=1.0, top_p=0.9)
    _, ref = _generate(_params(cfg), cfg, "packed_cpu", sp)
    sampler, res = _generate(_params(cfg), cfg, "packed_cpu", sp, mesh=mesh)
    np.testing.assert_array_equal(res.tokens, ref.tokens)
    # Not bit for bit: the packed products are (test_a_rows_result_does_not_depend_on_the_other_rows), but XLA:CPU
    # compiles the rest per shape, and a device's programs see 1/8 of the rows. Its reductions then reassociate a
    # row's sum by the row count (measured, jax 0.10.2, on the AMD EPYC here: a 256-wide log_softmax row differs by
    # 9.5e-7 between calls of 33 and of 3-9 rows, a logsumexp by 4.8e-7, a batched attention product by up to
    # 2.9e-6): a few float32 ulps per reduction, about ten reductions deep through 2 layers and the head. Seen:
    # 1.9e-6 on an Intel Xeon, 4.1e-6 here with XLA:CPU limited to SSE4.2 (--xla_cpu_max_isa=SSE4_2). 1e-5 holds
    # that with a 2.5x margin and stays 50x below a wrong-row error (a log-prob of another token differs by ~0.1+).
    np.testing.assert_allclose(res.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
    for leaf in jax.tree.leaves(sampler._weights):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
    for seed in (1, 2):
        new = _params(cfg, seed)
        sampler.update_params(new)
        got = sampler.params
        assert "lm_head" not in got or not cfg.tie_word_embeddings
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(new), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sampler._unstack._cache_size() == 1

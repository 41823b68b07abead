"""The sampler compiles its programs once per shape bucket, whatever the weights came from.

Compilations are counted with ``CompileLog`` (jax.monitoring's backend-compile events), across a second call,
new lengths in the same buckets and weight refreshes from ``load_hf``, ``init_params`` and a mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import pytest

from poer_jax.model.qwen import init_params
from poer_jax.model.sharding import make_mesh
from poer_jax.model.weights import load_hf
from poer_jax.sampler import GroupSampler, SamplerConfig, SamplingParams
from poer_jax.sampler.compiles import CompileLog

PROMPTS = ([3, 4, 5, 6, 7], [8, 9, 10])
OTHER = ([11, 12, 13, 14, 15, 16], [17, 18])  # other lengths, same buckets (prefill 8, <= 2 shared pages)


def _calls(sampler: GroupSampler, refreshes: list) -> list[int]:
    """Compilations of the first call, a second call, then a call after each weight refresh."""
    counts = []
    for i, new in enumerate([None, None, *refreshes]):
        if new is not None:
            sampler.update_params(new)
        with CompileLog() as log:
            sampler.generate(PROMPTS if i % 2 == 0 else OTHER, 2, [5, 4], jax.random.key(i))
        counts.append(log.count())
    return counts


@pytest.mark.parametrize("with_mesh", [False, True])
def test_no_recompiles_after_the_first_call(hf_qwen2_dir, with_mesh: bool) -> None:
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 2}, jax.devices()[:2]) if with_mesh else None
    params, cfg = load_hf(hf_qwen2_dir)  # weights on a one-device mesh
    scfg = SamplerConfig(page_size=4, num_pages=64, eos_ids=(1,), sampling=SamplingParams(temperature=1.0))
    sampler = GroupSampler(params, cfg, scfg, mesh=mesh)
    refreshes = [
        init_params(cfg, jax.random.key(1)),  # default-device arrays
        load_hf(hf_qwen2_dir)[0],
        load_hf(hf_qwen2_dir, mesh=make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, jax.devices()[2:4]))[0],
    ]
    counts = _calls(sampler, refreshes)
    assert counts[0] >= 2, counts  # prefill + decode were compiled by the first call (the log counts)
    assert counts[1:] == [0] * (len(counts) - 1), counts


@pytest.mark.parametrize("group_size", [1, 4])
@pytest.mark.parametrize("layer_loop", ["unrolled", "scan"])
def test_decode_writes_the_pool_in_place(group_size: int, layer_loop: str) -> None:
    """The compiled decode segment holds no copy of the KV pool: each step's KV write updates it in place.

    A copy would cost the whole pool's bytes per step (XLA:CPU copied K and V twice each when nothing ordered
    the write after the last layer's reads; engine.decode_step)."""
    from poer_jax.sampler.programs import sampler_program_specs
    from tests.test_sampler import QWEN2

    scfg = SamplerConfig(page_size=4, num_pages=96, max_slots=8, max_pages_per_seq=16, max_prefill_length=40,
                         attn_chunk_pages=2, layer_loop=layer_loop)
    spec = sampler_program_specs(QWEN2, scfg, None, group_size=group_size, prompt_len=18, max_new_tokens=24)[1]
    k_pages = spec.args[1].decode.k_pages
    pool = f"f32[{','.join(map(str, k_pages.shape))}]"  # fp32 model: an fp32 pool
    hlo = spec.fn.lower(*spec.args, **spec.kwargs).compile().as_text()
    assert hlo.count(f"= {pool}") > 0, pool  # the pool's shape is spelled as assumed here
    copies = [line.strip()[:120] for line in hlo.splitlines() if f"= {pool}" in line and " copy(" in line]
    assert copies == [], copies


@pytest.mark.parametrize("matmul_kernel", ["xla", "packed_cpu"])
@pytest.mark.parametrize("program", [0, 1])  # sampler/prefill, sampler/decode
def test_unrolled_programs_read_each_layers_weights_without_copying_them(program: int, matmul_kernel: str) -> None:
    """With the layers unrolled (the CPU default) the sampler's programs take the per-layer weights it holds
    (``GroupSampler.update_params``; packed in 32-column panels for the packed CPU kernel, which every product
    then calls) and copy none of them. The check's own witness: the layer scan's decode program slices (copies)
    every weight of the stacked layout."""
    from poer_jax.sampler.programs import sampler_program_specs
    from tests.test_sampler import QWEN2

    cfg = QWEN2.replace(hidden_size=24, intermediate_size=56)  # weight shapes no activation of these calls has
    # gate / up, down: as they are, or packed ([panels, K, 32])
    weight_shapes = ("f32[24,56]", "f32[56,24]") if matmul_kernel == "xla" else ("f32[2,24,32]", "f32[1,56,32]")

    def spec_of(layer_loop: str) -> Any:
        scfg = SamplerConfig(page_size=4, num_pages=96, max_slots=8, max_pages_per_seq=16, max_prefill_length=40,
                             layer_loop=layer_loop, matmul_kernel=matmul_kernel if layer_loop == "unrolled" else "xla")
        return sampler_program_specs(cfg, scfg, None, group_size=2, prompt_len=30, max_new_tokens=24)[program]

    def compiled(layer_loop: str) -> str:
        spec = spec_of(layer_loop)
        return spec.fn.lower(*spec.args, **spec.kwargs).compile().as_text()

    def weight_copies(hlo: str) -> list[str]:
        return [line.strip()[:120] for line in hlo.splitlines()
                if any(f"= {s}" in line for s in weight_shapes) and " parameter(" not in line
                and " get-tuple-element(" not in line and " tuple(" not in line]

    hlo = compiled("unrolled")
    assert sum(f"= {s}" in line and " parameter(" in line for line in hlo.splitlines() for s in weight_shapes) \
        >= 3 * cfg.num_layers  # the check sees the weights as the program takes them
    assert weight_copies(hlo) == []
    # 7 products per layer and the output projection, each one custom call (none with XLA's dot); the decode
    # program steps in two loops on CPU, all rows and the tail's (``sharded.decode_segment``)
    loops = 2 if program == 1 and spec_of("unrolled").kwargs["tail_rows"] else 1
    assert hlo.count('custom_call_target="poer_packed_matmul_f32"') == (7 * cfg.num_layers + 1) * loops * (
        matmul_kernel == "packed_cpu")
    if program == 1 and matmul_kernel == "xla":
        assert weight_copies(compiled("scan")), "the check no longer sees the layer scan's weight slices"

"""One assembly, two uses: the same config built abstractly for the plan (as ``scripts/plan.py --target=cpu-8``
does, through ``poer_jax.plan.build.target_programs``) and concretely on 8 CPU devices (as
``python -m poer_jax.train`` does, through ``PoerTrainer``) gives the same shapes, dtypes and shardings for
every buffer a run keeps: the train state, the reference weights, the sampler's weights, the KV pool and the
cache pool. Both go through ``poer_jax.system``; this test fails when one side's layout drifts from the other's
(a plan that would judge buffers the run does not allocate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import pytest

from poer_jax.plan import get_target
from poer_jax.plan.build import target_programs
from poer_jax.plan.compile import spec_arg
from poer_jax.program_spec import (
    RESIDENT_CACHE_POOL,
    RESIDENT_KV_POOL,
    RESIDENT_REF_PARAMS,
    RESIDENT_SAMPLER_PARAMS,
    RESIDENT_TRAIN_STATE,
)
from poer_jax.system.config import apply_overrides, load_config_file, validate
from tests.helpers_runs import ROOT, overrides

# a POER run on all 8 devices, every mesh axis 2 wide (the tiny model's 2 KV heads split over tensor), with a
# KL term so that the reference weights are resident too, on 20 of the 24 training rows (the cache pool's), with
# a held-out evaluation of 4 samples on each of the 8 held-out problems: its calls are the sampler's largest
MESH = {"mesh.num_devices": 8, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "loss.beta": 0.01,
        "cache.init": "solutions", "rollout.strategy": "poer", "data.limit": 20, "eval.enabled": True,
        "eval.num_samples": 4}


def _config(toy_env: dict, workdir: Path) -> Any:
    extra = ["toy.enabled=false", "warm_start.steps=0", *overrides(toy_env, workdir, **{
        k.replace(".", "__"): v for k, v in MESH.items()})]
    return validate(apply_overrides(load_config_file(ROOT / "configs" / "arithmetic.py"), extra))


@pytest.fixture(scope="module")
def both_ways(toy_env, tmp_path_factory) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """(the plan's resident buffers: every program's argument for each, the run's) by resident-set name."""
    from poer_jax.train.loop import PoerTrainer

    cfg = _config(toy_env, tmp_path_factory.mktemp("assembly") / "run")
    _, _, _, specs, extra, _ = target_programs(cfg, get_target("cpu-8"))
    planned = {name: [tree] for name, tree in extra.items()}  # the cache pool, which no program takes
    for spec in specs:
        for name, where in spec.resident.items():
            planned.setdefault(name, []).append(spec_arg(spec, where))
    with PoerTrainer(cfg) as run:
        k_pages, v_pages = run.sampler._pages()
        made = {RESIDENT_TRAIN_STATE: run.state, RESIDENT_REF_PARAMS: run.ref_params,
                RESIDENT_SAMPLER_PARAMS: run.sampler._weights, RESIDENT_KV_POOL: (k_pages, v_pages),
                RESIDENT_CACHE_POOL: run.pool}
        made = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), made)
    return planned, made


def _layout(tree: Any) -> tuple[Any, list[tuple[tuple[int, ...], str, Any]]]:
    leaves, structure = jax.tree.flatten(tree)
    return structure, [(tuple(x.shape), str(x.dtype), x.sharding) for x in leaves]


def _assert_same(planned: Any, made: Any, what: str) -> None:
    (p_tree, p_leaves), (m_tree, m_leaves) = _layout(planned), _layout(made)
    assert p_tree == m_tree, f"{what}: the plan's tree {p_tree} is not the run's {m_tree}"
    assert len(p_leaves) > 0
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(made)[0]]
    for path, (p_shape, p_dtype, p_sh), (m_shape, m_dtype, m_sh) in zip(paths, p_leaves, m_leaves, strict=True):
        assert (p_shape, p_dtype) == (m_shape, m_dtype), f"{what}{path}: plan {p_shape} {p_dtype}, run {m_shape}"
        assert p_sh is not None and p_sh.is_equivalent_to(m_sh, len(m_shape)), f"{what}{path}: plan {p_sh}, run {m_sh}"


@pytest.mark.parametrize("name", [RESIDENT_TRAIN_STATE, RESIDENT_REF_PARAMS, RESIDENT_SAMPLER_PARAMS])
def test_the_plan_and_the_run_hold_the_same_weights(both_ways, name: str) -> None:
    planned, made = both_ways
    for args in planned[name]:  # each program that takes them (the update, the log-prob pass, prefill, decode)
        _assert_same(args, made[name], name)


def test_the_plan_and_the_run_hold_the_same_kv_pool(both_ways) -> None:
    planned, made = both_ways
    for state in planned[RESIDENT_KV_POOL]:  # the sampler's slot state: its decode state holds the pool
        _assert_same((state.decode.k_pages, state.decode.v_pages), made[RESIDENT_KV_POOL], RESIDENT_KV_POOL)
    mesh_devices = made[RESIDENT_KV_POOL][0].sharding.mesh.devices
    assert mesh_devices.shape == (2, 2, 2)  # the run's own 8-device mesh, as configured


def test_the_plan_and_the_run_hold_the_same_cache_pool(both_ways) -> None:
    planned, made = both_ways
    (pool,) = planned[RESIDENT_CACHE_POOL]
    _assert_same(pool, made[RESIDENT_CACHE_POOL], RESIDENT_CACHE_POOL)

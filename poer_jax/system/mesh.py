"""The (data, fsdp, tensor) mesh from ``mesh.*`` over a list of devices (a run's own, or a plan target's), and
the batch layout over it: every mini- and micro-batch's rows divide over the batch devices (data x fsdp)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from poer_jax.model.sharding import make_mesh
from poer_jax.system.config import ConfigError
from poer_jax.system.multihost import ProcessRows


def mesh_for(cfg: ml_collections.ConfigDict, devices: list[Any]) -> Mesh:
    """The mesh of ``mesh.*`` over ``devices`` (the first ``mesh.num_devices`` of them when set): a run's own
    devices (``build_mesh``) or a plan target's, real or abstract (a TPU topology's)."""
    devices = devices[: cfg.mesh.num_devices] if cfg.mesh.num_devices else devices
    try:
        return make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}, devices)
    except ValueError as e:
        raise ConfigError(f"config section 'mesh': {e}") from e


def build_mesh(cfg: ml_collections.ConfigDict) -> tuple[Mesh, ProcessRows]:
    """The run's mesh over this job's devices and this process's view of its batch rows."""
    mesh = mesh_for(cfg, jax.devices())
    return mesh, ProcessRows(mesh)  # this process's rows <-> global arrays (identity on one process)


def check_batch_layout(cfg: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The rows of every mini-batch and micro-batch divide over the batch devices (data x fsdp), or a
    ConfigError names the keys: otherwise XLA silently falls back to another layout."""
    n_dev = mesh.shape["data"] * mesh.shape["fsdp"]
    o = cfg.optim
    rows = cfg.data.questions_per_step * cfg.rollout.group_size
    mini = rows // o.num_minibatches
    micro = mini // o.micro_batches
    if mini % n_dev or micro % n_dev:
        good = [k for k in range(1, mini + 1) if mini % k == 0 and (mini // k) % n_dev == 0]
        hint = (f"e.g. optim.micro_batches in {good[-4:]} ({[mini // k for k in good[-4:]]} rows each)" if good
                else "make data.questions_per_step x rollout.group_size / optim.num_minibatches a multiple of it")
        raise ConfigError(
            f"config keys 'optim.micro_batches' / 'optim.num_minibatches': micro-batches of {micro} rows "
            f"(data.questions_per_step {cfg.data.questions_per_step} x rollout.group_size {cfg.rollout.group_size}"
            f" / num_minibatches {o.num_minibatches} / micro_batches {o.micro_batches}) do not divide over the "
            f"{n_dev} batch devices (mesh data x fsdp); {hint}")

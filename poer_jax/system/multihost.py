"""Multi-host plumbing: one process per host, the same command on every host (TPU pod, GPU cluster).

Under ``jax.distributed.initialize`` every process runs the whole loop in lockstep; what differs is which
questions it owns. Process p of P owns rows [p * B/P, (p+1) * B/P) of each global batch of B questions
(``EpochIterator``), and:

* rolls them out on its own devices: the sampler runs on a *process-local* mesh, so rollout work is split
  over hosts instead of repeated on each (weights reach it through :class:`ProcessLocalParams`);
* scores them with its own reward pool;
* contributes them to every global computation through :meth:`ProcessRows.to_global` (the cache-pool
  truncation and update, the policy update batch), built with ``make_array_from_process_local_data``, so
  row r of a global array is the row r a single process would have had;
* reads back the rows it owns with :meth:`ProcessRows.to_local`, and everybody's with
  :meth:`ProcessRows.gather` (step metrics, written by process 0 only).

With one process every helper is the identity (or a plain device transfer), so the single-host path
is unchanged.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from poer_jax.model.config import QwenConfig
from poer_jax.model.sharding import BATCH_AXES, MESH_AXES, batch_sharding, decode_param_shardings
from poer_jax.sampler.sharded import decode_weights
from poer_jax.system.config import ConfigError

ENV_INT = ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_from_env() -> bool:
    """``jax.distributed.initialize`` when the environment asks for it; returns whether it did.

    It does when ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) or ``POER_JAX_DISTRIBUTED=1`` is
    set. ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` give the process count and index where no cluster
    environment (TPU pod, SLURM, Open MPI, Kubernetes) is auto-detected by JAX.
    """
    if not (os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("POER_JAX_DISTRIBUTED")):
        return False
    kwargs: dict[str, int] = {}
    for name, arg in zip(ENV_INT, ("num_processes", "process_id"), strict=True):
        raw = os.environ.get(name)
        if raw is None:
            continue
        try:
            kwargs[arg] = int(raw)
        except ValueError:
            raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None
    jax.distributed.initialize(**kwargs)
    return True


def is_main_process() -> bool:
    """Process 0 writes what is written once: metrics, TensorBoard, the exported model, the toy files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def host_copy(tree: Any) -> Any:
    """A full numpy copy of a (possibly multi-host sharded) pytree on every process; a collective."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree)


class ProcessRows:
    """Row-batched arrays between this process's rows (host numpy) and global arrays on ``mesh``.

    Global arrays are sharded over the batch axes (data, fsdp), which must span the processes evenly: each
    process's devices hold a contiguous block of rows. Local blocks are padded to a multiple of the
    batch-axis devices per process; pass ``fill`` values that the consumer ignores (index -1 for the cache
    pool, whose writers drop rows outside [0, N)).
    """

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.count, self.index = jax.process_count(), jax.process_index()
        shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
        if self.count > 1:
            if shards % self.count:
                raise ConfigError(
                    f"config section 'mesh': on {self.count} processes the batch axes data x fsdp "
                    f"({shards} devices) must be a multiple of the process count (keep 'tensor' within a host)")
            self._check_contiguous(shards)
        self.multiple = shards // self.count if self.count > 1 else 1

    @property
    def multihost(self) -> bool:
        return self.count > 1

    def _check_contiguous(self, shards: int) -> None:
        sharding = batch_sharding(self.mesh, 1)
        starts = sorted({idx[0].start or 0 for idx in sharding.addressable_devices_indices_map((shards,)).values()})
        per = shards // self.count
        if starts != list(range(self.index * per, (self.index + 1) * per)):
            raise ConfigError(
                "config section 'mesh': this process's devices do not hold a contiguous block of the batch "
                "axes; order the mesh devices by process (jax.devices() order)")

    def _padded(self, x: np.ndarray, fill: Any) -> np.ndarray:
        x = np.asarray(x)
        n = x.shape[0]
        target = -(-max(n, 1) // self.multiple) * self.multiple
        if target == n:
            return x
        pad = np.full((target - n, *x.shape[1:]), fill, x.dtype)
        return np.concatenate([x, pad])

    def to_global(self, x: np.ndarray, fill: Any = 0) -> jax.Array:
        """This process's rows -> a global array (rows of process 0 first); single process: a device array."""
        if not self.multihost:
            return jnp.asarray(x)
        x = self._padded(x, fill)
        return jax.make_array_from_process_local_data(batch_sharding(self.mesh, x.ndim), x)

    def to_local(self, x: jax.Array, num_rows: int) -> np.ndarray:
        """The first ``num_rows`` of this process's block of rows of a global array whose rows are laid out
        as :meth:`to_global` lays them (block p = rows [p * R/P, (p+1) * R/P)), whatever its sharding;
        single process: the first ``num_rows`` rows."""
        if not self.multihost or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))[:num_rows]
        per = x.shape[0] // self.count
        lo, hi = self.index * per, (self.index + 1) * per
        out = np.empty((per, *x.shape[1:]), x.dtype)
        covered = np.zeros((per,), bool)
        for shard in x.addressable_shards:
            rows = shard.index[0] if shard.index else slice(None)
            start, stop, _ = rows.indices(x.shape[0])
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                out[(slice(a - lo, b - lo), *shard.index[1:])] = np.asarray(shard.data)[a - start: b - start]
                covered[a - lo: b - lo] = True
        if not covered.all():
            raise ValueError(f"multi-host: process {self.index} does not hold all of its rows [{lo}, {hi}) of an "
                             f"array sharded as {x.sharding}")
        return out[:num_rows]

    def gather(self, x: np.ndarray) -> np.ndarray:
        """Every process's rows, concatenated in process order (equal shapes on every process)."""
        x = np.asarray(x)
        return x if not self.multihost else np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def max(self, value: float) -> Any:
        """The largest ``value`` over processes (an int stays an int)."""
        return self.gather(np.asarray([value])).max().item()

    def all(self, value: bool) -> bool:
        return bool(self.gather(np.asarray([value])).all())


class ProcessLocalParams:
    """The sampler's mesh and weights: the global mesh on one process; on several, this process's devices.

    The sampler's weights are laid out for decoding (``decode_param_shardings``: whole on every device of the
    batch axes, split over ``tensor``) in the compute dtype (``decode_weights``), refreshed from the trained
    weights (FSDP layout, master dtype) by one jitted reshard + cast, never through the host.

    On several processes the local mesh is (data 1, fsdp n/t, tensor t) over the process's n devices,
    t = gcd(global tensor, n). The reshard then targets a "bridge" mesh over all devices, (data P, fsdp n/t,
    tensor t) with row p the devices of process p (one jitted collective, every process in lockstep): it
    leaves on each process a complete copy laid out like the local mesh, whose shards are re-wrapped as
    process-local arrays without a copy.

    ``frozen`` and ``combine``: the trained weights are not the model's (LoRA's adapters); the model's are
    ``combine(frozen, trained)`` (the base with the adapters merged), computed in the same jitted program as the
    reshard and cast, so the sampler gets merged weights in one program per update.
    """

    def __init__(self, mesh: Mesh, cfg: QwenConfig, frozen: Any = None,
                 combine: Callable[[Any, Any], Any] | None = None):
        self.cfg, self.frozen = cfg, frozen

        def cast(frozen: Any, params: Any) -> Any:
            return decode_weights(params if combine is None else combine(frozen, params), cfg)

        if jax.process_count() == 1:
            self.mesh, self.bridge = mesh, None
            self._reshard = jax.jit(cast, out_shardings=decode_param_shardings(cfg, mesh))
            return
        by_process: dict[int, list[Any]] = {}
        for d in sorted(mesh.devices.flat, key=lambda d: (d.process_index, d.id)):
            by_process.setdefault(d.process_index, []).append(d)
        counts = {len(v) for v in by_process.values()}
        if len(counts) != 1:
            raise ConfigError(f"multi-host: every process needs the same number of devices, got "
                              f"{ {p: len(v) for p, v in by_process.items()} }")
        n = counts.pop()
        t = math.gcd(mesh.shape["tensor"], n)
        rows = np.array([by_process[p] for p in sorted(by_process)], dtype=object)
        self.bridge = Mesh(rows.reshape(len(by_process), n // t, t), MESH_AXES)
        self.mesh = Mesh(rows[[sorted(by_process).index(jax.process_index())]].reshape(1, n // t, t), MESH_AXES)
        self._reshard = jax.jit(cast, out_shardings=decode_param_shardings(cfg, self.bridge))

    def __call__(self, params: Any) -> Any:
        """Decode-layout weights on ``self.mesh`` (a collective on several processes: call it on all)."""
        laid_out = self._reshard(self.frozen, params)
        if self.bridge is None:
            return laid_out

        def local(x: jax.Array) -> jax.Array:
            sharding = NamedSharding(self.mesh, x.sharding.spec)
            by_device = {s.device: s.data for s in x.addressable_shards}
            return jax.make_array_from_single_device_arrays(
                x.shape, sharding, [by_device[d] for d in self.mesh.devices.flat])

        return jax.tree.map(local, laid_out)


__all__ = ["ProcessLocalParams", "ProcessRows", "barrier", "host_copy", "initialize_from_env",
           "is_main_process"]
